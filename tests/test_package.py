"""The installed package: every module imports as megatron_lora.*, and no plain ``parallel`` module.

``parallel/`` installs as ``megatron_lora.parallel``; from the repository root a plain
``import parallel`` would still resolve and load the same files a second time as other modules.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib, pkgutil, sys, warnings
warnings.filterwarnings("ignore")
import megatron_lora
names = [m.name for m in pkgutil.walk_packages(megatron_lora.__path__, "megatron_lora.")]
names += ["megatron_lora.parallel." + m.name for m in pkgutil.iter_modules(importlib.import_module("megatron_lora.parallel").__path__)]
for name in names:
    if name.endswith("__main__"):
        continue
    importlib.import_module(name)
plain = sorted(n for n in sys.modules if n == "parallel" or n.startswith("parallel."))
print(len(names), plain)
"""


def test_every_module_imports_under_the_package_and_no_plain_parallel():
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, plain = proc.stdout.split(" ", 1)
    assert int(count) >= 20
    assert plain.strip() == "[]"
    assert (ROOT / "parallel" / "cpu.py").is_file()
    import megatron_lora.parallel.cpu as cpu

    assert Path(cpu.__file__).resolve() == (ROOT / "parallel" / "cpu.py").resolve()
