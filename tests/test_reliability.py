"""Bad input loses nothing and never converts silently into a different model.

One test per defect of the adversarial run (the reliability issue's items; 7 and 8 are
tested with fine-tuning and the precision rule). Each test runs several cases through
:class:`Cases`, which records every case before failing, so the share of cases handled can
be counted on any tree: ``RELIABILITY_COUNTS=file.json pytest tests/test_reliability.py``.
CLI cases run in-process through ``megatron_lora.cli.main``; only SIGTERM needs a process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_lora.cli import main as cli_main
from megatron_lora.formats.convert import base_facts, convert
from test_convert import _copy_peft, adapter, base, leftovers, tensors  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
PEFT_WEIGHTS = "adapter_model.safetensors"


class Cases:
    """Run named cases, keep going after a failure, fail the test at the end with all of them."""

    def __init__(self, item: str):
        self.item, self.tried, self.failed = item, [], []

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.tried.append(name)
        try:
            yield
        except (Exception, SystemExit, pytest.fail.Exception):  # pytest's Failed is a BaseException
            self.failed.append(f"{name}: {traceback.format_exc(limit=-2)}")

    def done(self) -> None:
        path = os.environ.get("RELIABILITY_COUNTS")
        if path:
            counts = json.loads(Path(path).read_text()) if Path(path).exists() else {}
            counts[self.item] = [len(self.tried) - len(self.failed), len(self.tried)]
            Path(path).write_text(json.dumps(counts, indent=1))
        assert not self.failed, "\n".join(self.failed)


def _cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of ``megatron-lora ARGV`` run in this process."""
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if "error" in line]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def meg(base, adapter, tmp_path_factory) -> Path:
    """The PEFT adapter as a megatron-lora checkpoint at TP=2."""
    out = tmp_path_factory.mktemp("meg") / "tp2"
    convert(adapter, out, "megatron", facts=base_facts(base), tp=2, progress=False)
    return out


def _copy_dir(src: Path, dst: Path, config_update: dict | None = None) -> Path:
    """A copy of an adapter directory with ``config_update`` ({"a/b": value or _DELETE}) applied."""
    shutil.copytree(src, dst)
    if config_update is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        for k, v in config_update.items():
            target = cfg
            *path, last = k.split("/")
            for p in path:
                target = target[p]
            if v is _DELETE:
                target.pop(last, None)
            else:
                target[last] = v
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


_DELETE = object()


def _fresh(parent: Path) -> Path:
    """An output path not used yet (so one case's output cannot fail the next)."""
    i = 0
    while (parent / f"out{i}").exists():
        i += 1
    return parent / f"out{i}"


def _xlora_dir(root: Path, experts: dict[str, str], **config) -> Path:
    """A PEFT X-LoRA directory (depth 1, one scaling per expert) over ``experts``."""
    n = len(experts)
    root.mkdir()
    torch.manual_seed(0)
    save_file({"base_model.internal_xlora_classifier.layers.0.weight": torch.randn(max(n, 1), 64),
               "base_model.internal_xlora_classifier.layers.0.bias": torch.randn(max(n, 1))},
              str(root / PEFT_WEIGHTS))
    cfg = {"peft_type": "XLORA", "hidden_size": 64, "adapters": experts, "xlora_depth": 1, **config}
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    return root


# -- data loss or silently wrong output -------------------------------------------------------------


def test_01_rename_never_replaces_what_appeared(base, adapter, tmp_path, monkeypatch):
    import megatron_lora.formats.convert as conv

    cases, original = Cases("01 rename without replacing"), conv.write_safetensors
    for name, kind in (("dir", "dir"), ("empty_dir", "empty"), ("file", "file")):
        with cases(name):
            out = tmp_path / name

            def racing(*args, **kwargs):  # someone creates the output while we convert
                if os.path.lexists(out):
                    pass
                elif kind == "file":
                    out.write_text("theirs")
                else:
                    out.mkdir()
                    if kind == "dir":
                        (out / "keep.txt").write_text("theirs")
                return original(*args, **kwargs)

            monkeypatch.setattr(conv, "write_safetensors", racing)
            before = leftovers(tmp_path)
            with pytest.raises(FileExistsError, match="appeared"):
                convert(adapter, out, "megatron", facts=base_facts(base), tp=2, progress=False)
            if kind == "file":
                assert out.read_text() == "theirs"
            else:
                assert sorted(p.name for p in out.iterdir()) == (["keep.txt"] if kind == "dir" else [])
            assert leftovers(tmp_path) == before
    cases.done()


def test_02_size_flags_are_positive_integers(base, adapter, meg, tmp_path, capsys):
    cases = Cases("02 size flags")
    for i, (src, tp) in enumerate([(adapter, -1), (adapter, 0), (meg, -2), (meg, 0), (meg, "x")]):
        with cases(f"convert {src.name} --tp {tp}"):
            try:
                code, err = _cli(capsys, "convert", src, tmp_path / f"o{i}", "--to", "megatron", "--base", base,
                                 "--tp", tp)
            except SystemExit as e:  # argparse: "--tp x" is not an integer
                code, err = e.code, capsys.readouterr().err
                assert code == 2 and "--tp" in err
            else:
                _one_line_error(code, err, "--tp")
            assert not (tmp_path / f"o{i}").exists() and leftovers(tmp_path) == []
    with cases("library tp=0"):
        with pytest.raises(ValueError, match="positive integer"):
            convert(meg, tmp_path / "lib", "megatron", tp=0, progress=False)
    with cases("generate --tp 0"):
        from megatron_lora.cli.generate import generate_from_dirs

        with pytest.raises(ValueError, match="--tp must be a positive integer"):
            generate_from_dirs(str(base), input_ids="1,2", tp=0)
    cases.done()


def test_03_tensor_rank_must_be_the_effective_rank(base, adapter, meg, tmp_path):
    facts, cases = base_facts(base), Cases("03 rank vs config")
    for name, update in (("r", {"r": 8}), ("no r: PEFT's default 8", {"r": _DELETE}),
                         ("rank_pattern", {"rank_pattern": {"k_proj": 2}})):
        with cases(name):
            src = _copy_dir(adapter, tmp_path / name.split(":")[0], update)
            with pytest.raises(ValueError, match=r"has rank 4, but the config gives it r=(8|2)"):
                convert(src, _fresh(tmp_path), "megatron", facts=facts, tp=2, progress=False)
    with cases("megatron checkpoint"):
        src = _copy_dir(meg, tmp_path / "meg", {"lora_config/r": 8})
        with pytest.raises(ValueError, match="has rank 4, but the config gives it r=8"):
            convert(src, _fresh(tmp_path), "peft", progress=False)
    with cases("nothing written"):
        assert not list(tmp_path.glob("out*"))
    cases.done()


def test_04_tensors_must_be_what_the_config_adapts(base, adapter, tmp_path):
    facts, cases = base_facts(base), Cases("04 tensors vs targets")
    for name, update, match in (
        ("target q_proj", {"target_modules": ["q_proj"]}, "which the config does not adapt"),
        ("layers_to_transform", {"layers_to_transform": [0]}, r"model\.layers\.1\..*, which the config does not adapt"),
        ("exclude_modules", {"exclude_modules": ["v_proj"]}, "v_proj, which the config does not adapt"),
        ("regex", {"target_modules": r".*\.(q|k)_proj"}, "which the config does not adapt"),
    ):
        with cases(name):
            src = _copy_dir(adapter, tmp_path / name.replace(" ", "_"), update)
            with pytest.raises(ValueError, match=match):
                convert(src, _fresh(tmp_path), "megatron", facts=facts, tp=1, progress=False)
    with cases("config adapts modules without tensors"):
        t = tensors(adapter / PEFT_WEIGHTS)
        src = _copy_peft(adapter, tmp_path / "missing")
        save_file({k: v for k, v in t.items() if "k_proj" not in k}, str(src / PEFT_WEIGHTS))
        with pytest.raises(ValueError, match="k_proj.*no tensors"):
            convert(src, _fresh(tmp_path), "megatron", facts=facts, tp=1, progress=False)
    with cases("nothing written"):
        assert not list(tmp_path.glob("out*"))
    cases.done()


def test_05_layer_indices_are_parsed_strictly(base, adapter, tmp_path):
    facts, cases = base_facts(base), Cases("05 layer indices")
    t = tensors(adapter / PEFT_WEIGHTS)
    for name, alias in (("leading zero", "layers.01."), ("fullwidth digit", "layers.\uff11.")):
        with cases(name):
            extra = {k.replace("layers.1.", alias): v.clone() for k, v in t.items() if "layers.1." in k}
            src = _copy_peft(adapter, tmp_path / name.replace(" ", "_"), tensors_update=extra)
            with pytest.raises(ValueError, match="not a linear projection"):
                convert(src, tmp_path / "out", "megatron", facts=facts, tp=1, progress=False)
    with cases("megatron key with a leading zero"):
        from megatron_lora.formats.checkpoint import parse_key

        with pytest.raises(ValueError, match="not a megatron-lora adapter key"):
            parse_key("decoder.layers.01.self_attention.linear_qkv.lora_A.q_proj")
    cases.done()


def test_06_rank_files_are_checked_against_tp_size(meg, tmp_path):
    cases = Cases("06 rank files vs tp_size")
    lie = _copy_dir(meg, tmp_path / "lie", {"tp_size": 1})  # two TP=2 files, config says TP=1
    for to, tp in (("megatron", 2), ("megatron", 1), ("peft", None)):
        with cases(f"--to {to} --tp {tp}"):
            with pytest.raises(ValueError, match=r"tp_rank_00.safetensors: .* has shape .* tp_size=1 .* need"):
                convert(lie, _fresh(tmp_path), to, tp=tp, progress=False)
    with cases("rank files disagree"):
        odd = _copy_dir(meg, tmp_path / "odd")
        t = tensors(odd / "tp_rank_01.safetensors")
        save_file(dict(list(t.items())[1:]), str(odd / "tp_rank_01.safetensors"))
        with pytest.raises(ValueError, match="holds other tensors"):
            convert(odd, _fresh(tmp_path), "megatron", tp=1, progress=False)
    with cases("nothing written"):
        assert not list(tmp_path.glob("out*"))
    cases.done()


def test_09_verify_decides_before_the_rename(base, adapter, meg, tmp_path, capsys, monkeypatch):
    import megatron_lora.cli.convert as conv

    cases = Cases("09 verify before rename")
    with cases("--verify without --base"):
        code, err = _cli(capsys, "convert", meg, tmp_path / "a", "--to", "peft", "--verify")
        _one_line_error(code, err, "--verify needs --base")
        assert not (tmp_path / "a").exists()

    def cannot_load(*args):
        raise RuntimeError("the reference cannot load the adapter")

    monkeypatch.setattr(conv, "verify", cannot_load)
    with cases("reference fails"):
        with pytest.raises(RuntimeError, match="cannot load"):
            cli_main(["convert", str(meg), str(tmp_path / "b"), "--to", "peft", "--base", str(base), "--verify"])
        assert not (tmp_path / "b").exists()
    monkeypatch.setattr(conv, "verify", lambda *args: (1.0, 2.0))
    with cases("logits differ"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "keep.txt").write_text("old")
        code, err = _cli(capsys, "convert", adapter, tmp_path / "c", "--to", "megatron", "--base", base,
                         "--overwrite", "--verify")
        _one_line_error(code, err, "verification failed")
        assert (tmp_path / "c" / "keep.txt").read_text() == "old"  # the old output stays
    assert leftovers(tmp_path) == []
    cases.done()


_SIGTERM_SCRIPT = """
import sys, time
import megatron_lora.formats.convert as conv
original = conv.write_safetensors
def slow(*args, **kwargs):
    original(*args, **kwargs)
    print("written", flush=True)
    time.sleep(120)
conv.write_safetensors = slow
from megatron_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_10_sigterm_and_stale_temporaries(base, adapter, tmp_path):
    cases = Cases("10 SIGTERM and stale temporaries")
    with cases("SIGTERM"):
        env = {**os.environ, "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGTERM_SCRIPT, "convert", str(adapter), str(tmp_path / "out"),
             "--to", "megatron", "--base", str(base), "--tp", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "written"
            assert len(leftovers(tmp_path)) == 1  # the temporary directory, with a rank file
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 128 + signal.SIGTERM or proc.returncode == -signal.SIGTERM, err
        assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    with cases("stale temporary of a dead process"):
        host = socket.gethostname()
        stale = tmp_path / f".out.megatron-lora-tmp.{_dead_pid()}.0123abcd.{host}"
        live = tmp_path / f".out.megatron-lora-tmp.{os.getpid()}.0123abcd.{host}"
        for d in (stale, live):
            d.mkdir()
            (d / "tp_rank_00.safetensors").write_bytes(b"partial")
        convert(adapter, tmp_path / "out", "megatron", facts=base_facts(base), tp=1, progress=False)
        assert not stale.exists() and live.exists()  # a live process's temporary is not touched
    cases.done()


def test_11_overwrite_of_the_working_directory(adapter, base, meg, tmp_path, capsys, monkeypatch):
    cases = Cases("11 --overwrite .")
    work = _copy_dir(meg, tmp_path / "work")
    (tmp_path / "outer" / "inner").mkdir(parents=True)
    for name, cwd, dst, kept in (("dot", work, ".", sorted(p.name for p in meg.iterdir())),
                                 ("a parent", tmp_path / "outer" / "inner", str(tmp_path / "outer"), ["inner"])):
        with cases(name):
            monkeypatch.chdir(cwd)
            code, err = _cli(capsys, "convert", adapter, dst, "--to", "megatron", "--base", base, "--overwrite")
            _one_line_error(code, err, "working directory")
            assert sorted(p.name for p in Path(dst).iterdir()) == kept
            assert leftovers(tmp_path) == [] and leftovers(work) == []
    cases.done()


def test_12_damaged_megatron_configs_name_the_file(meg, base, adapter, tmp_path):
    cases = Cases("12 damaged megatron-lora config")
    for i, (field, value) in enumerate([
        ("tp_size", _DELETE), ("tp_size", "2"), ("tp_size", 0), ("model", _DELETE), ("model/head_dim", _DELETE),
        ("model/head_dim", "8"), ("lora_config", _DELETE), ("lora_config", ["r"]), ("lora_config/lora_dropout", "x"),
        ("kind", _DELETE),
    ]):
        with cases(f"{field}={'deleted' if value is _DELETE else value!r}"):
            src = _copy_dir(meg, tmp_path / f"c{i}", {field: value})
            with pytest.raises(ValueError, match=r"c\d+/adapter_config.json: "):
                convert(src, tmp_path / "out", "peft", progress=False)
    with cases("xlora_config missing"):
        xl = _xlora_dir(tmp_path / "x", {"0": str(adapter), "1": str(adapter)})
        convert(xl, tmp_path / "xmeg", "megatron", facts=base_facts(base), tp=1, progress=False)
        src = _copy_dir(tmp_path / "xmeg", tmp_path / "xbad", {"xlora_config": _DELETE})
        with pytest.raises(ValueError, match="xbad/adapter_config.json: xlora_config is missing"):
            convert(src, tmp_path / "out", "peft", progress=False)
    cases.done()


def test_13_invalid_values_are_refused_up_front(base, adapter, tmp_path):
    from megatron_lora.config import LoraConfig
    from megatron_lora.runtime.generation import generate

    facts, cases = base_facts(base), Cases("13 invalid values")
    for name, update, match in (
        ("target regex", {"target_modules": "(q"}, "not a valid regex"),
        ("rank_pattern regex", {"rank_pattern": {"(k": 4}}, "not a valid regex"),
        ("lora_alpha string", {"lora_alpha": "8"}, "lora_alpha must be a finite number"),
    ):
        with cases(name):
            src = _copy_dir(adapter, tmp_path / name.replace(" ", "_"), update)
            with pytest.raises(ValueError, match=match):
                convert(src, _fresh(tmp_path), "megatron", facts=facts, tp=1, progress=False)
    with cases("lora_alpha nan"):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            LoraConfig(lora_alpha=float("nan"))
    with cases("top_k_lora > experts"):
        xl = _xlora_dir(tmp_path / "topk", {"0": str(adapter), "1": str(adapter)}, top_k_lora=5)
        with pytest.raises(ValueError, match="top_k_lora=5 exceeds the 2 experts"):
            convert(xl, _fresh(tmp_path), "megatron", facts=facts, tp=1, progress=False)
    with cases("X-LoRA without experts"):
        xl = _xlora_dir(tmp_path / "none", {})
        with pytest.raises(ValueError, match="at least one expert"):
            convert(xl, _fresh(tmp_path), "megatron", facts=facts, tp=1, progress=False)
    with cases("LoRA without tensors"):
        src = _copy_peft(adapter, tmp_path / "empty")
        save_file({}, str(src / PEFT_WEIGHTS))
        with pytest.raises(ValueError, match="holds no LoRA tensors"):
            convert(src, _fresh(tmp_path), "megatron", facts=facts, tp=1, progress=False)
    for name, kwargs, match in (("max_new_tokens -5", {"max_new_tokens": -5}, "max_new_tokens"),
                                ("temperature nan", {"max_new_tokens": 2, "temperature": float("nan")}, "temperature"),
                                ("top_p nan", {"max_new_tokens": 2, "top_p": float("nan")}, "top_p")):
        with cases(name):
            with pytest.raises(ValueError, match=match):
                generate(None, [1, 2], **kwargs)  # refused before the model is touched
    with cases("nothing written"):
        assert not list(tmp_path.glob("out*"))
    cases.done()


def test_14_failed_apply_lora_leaves_the_model_as_it_was():
    from megatron_lora import LoraConfig, apply_lora, init_distributed
    from megatron_lora.model.gpt import build_gpt, gpt_config

    cases = Cases("14 apply_lora validates first")
    init_distributed(1)
    model = build_gpt(gpt_config(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64), 64)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    qkv0 = model.decoder.layers[0].self_attention.linear_qkv
    # Layer 0 is visited first and fits; layer 1 holds "default" already / names both schemes.
    both = r"model\.layers\.[01]\.self_attn\.q_proj|decoder\.layers\.1\.self_attention\.linear_qkv"
    for name, config, adapter_name in (("existing name", LoraConfig(r=2, target_modules=["v_proj"]), "default"),
                                       ("both naming schemes", LoraConfig(r=2, target_modules=both), "second")):
        with cases(name):
            with pytest.raises(ValueError):
                apply_lora(model, config, adapter_name)
            assert list(getattr(qkv0, "lora_specs", {})) == []
    cases.done()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_15_os_errors_and_entry_points_give_one_line(base, adapter, tmp_path, capsys, monkeypatch):
    cases = Cases("15 one-line errors")
    with cases("dangling symlink output"):
        link = tmp_path / "link"
        link.symlink_to(tmp_path / "nowhere")
        code, err = _cli(capsys, "convert", adapter, link, "--to", "megatron", "--base", base)
        _one_line_error(code, err, "already exists")
        assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    with cases("HF config without num_attention_heads"):
        other = tmp_path / "hf"
        other.mkdir()
        cfg = json.loads((base / "config.json").read_text())
        del cfg["num_attention_heads"]
        (other / "config.json").write_text(json.dumps(cfg))
        code, err = _cli(capsys, "convert", adapter, tmp_path / "o", "--to", "megatron", "--base", other)
        _one_line_error(code, err, "config.json", "num_attention_heads")
    with cases("plot-scalings without matplotlib"):
        save_file({"scalings": torch.rand(3, 2, 2)}, str(tmp_path / "s.safetensors"))
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
        code, err = _cli(capsys, "plot-scalings", tmp_path / "s.safetensors", "-o", tmp_path / "s.png")
        _one_line_error(code, err, "matplotlib")
        monkeypatch.delitem(sys.modules, "matplotlib")
    with cases("unwritable output (EACCES)"):
        # As root nothing is unwritable; a read-only bind is not available: simulate the OS error.
        import megatron_lora.formats.outputs as outputs

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

        with monkeypatch.context() as m:
            m.setattr(outputs, "_begin", denied)
            code, err = _cli(capsys, "convert", adapter, tmp_path / "ro" / "out", "--to", "megatron", "--base", base)
        _one_line_error(code, err, "Permission denied")
    with cases("generate.py input error"):
        code = _script("generate").main(["--base", str(base), "--input-ids", "1,2", "--adapter",
                                         str(tmp_path / "missing")])
        _one_line_error(code, capsys.readouterr().err, "generate.py: error", "missing")
    with cases("generate.py on rank 1 stays quiet"):
        monkeypatch.setenv("RANK", "1")
        code = _script("generate").main(["--base", str(base), "--input-ids", "1,2", "--tp", "0"])
        assert code == 1 and capsys.readouterr().err == ""
    cases.done()


def test_16_errors_give_the_right_reason(base, adapter, tmp_path):
    cases = Cases("16 right reasons")
    with cases("missing LoRA --adapter"):
        from megatron_lora.cli.generate import generate_from_dirs

        with pytest.raises(FileNotFoundError) as e:
            generate_from_dirs(str(base), input_ids="1,2", adapter=str(tmp_path / "missing"))
        assert "X-LoRA" not in str(e.value) and "missing" in str(e.value)
    with cases("FIFO as the weights"):
        src = _copy_peft(adapter, tmp_path / "fifo")
        (src / PEFT_WEIGHTS).unlink()
        os.mkfifo(src / PEFT_WEIGHTS)
        with pytest.raises(ValueError, match="is not a regular file"):
            convert(src, _fresh(tmp_path), "megatron", facts=base_facts(base), tp=1, progress=False)
    with cases("parent is a file"):
        (tmp_path / "afile").write_text("x")
        with pytest.raises(NotADirectoryError, match="afile is not a directory"):
            convert(adapter, tmp_path / "afile" / "out", "megatron", facts=base_facts(base), tp=1, progress=False)
    with cases("damaged file vs an OS error"):
        from megatron_lora.formats import files

        def interrupted(*args, **kwargs):  # an interrupted read is not a damaged file
            raise InterruptedError(4, "Interrupted system call")

        original, files.safe_open = files.safe_open, interrupted
        try:
            with pytest.raises(OSError) as e:
                files.open_safetensors(adapter / PEFT_WEIGHTS)
            assert "not a readable safetensors" not in str(e.value)
        finally:
            files.safe_open = original
    cases.done()


def _modes(root: Path) -> set[tuple[str, int]]:
    out = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)))
    return out


def test_17_outputs_follow_the_umask(base, adapter, tmp_path):
    cases = Cases("17 permissions")
    old = os.umask(0o022)
    try:
        facts = base_facts(base)
        xl = _xlora_dir(tmp_path / "xl", {"0": str(adapter), "1": str(adapter)})
        for name, run in (
            ("lora", lambda out: convert(adapter, out, "megatron", facts=facts, tp=2, progress=False)),
            ("xlora megatron", lambda out: convert(xl, out, "megatron", facts=facts, tp=2, progress=False)),
            ("xlora peft", lambda out: convert(xl, out, "peft", facts=facts, progress=False)),
        ):
            with cases(name):
                run(tmp_path / name.replace(" ", "_"))
                assert _modes(tmp_path / name.replace(" ", "_")) == {("dir", 0o755), ("file", 0o644)}
    finally:
        os.umask(old)
    cases.done()


def test_18_where_experts_come_from(adapter, base, tmp_path, capsys):
    cases = Cases("18 expert provenance")
    xl = _xlora_dir(tmp_path / "xl", {"0": str(adapter), "1": "../elsewhere"})
    _copy_dir(adapter, tmp_path / "elsewhere")
    with cases("inspect --json"):
        capsys.readouterr()
        assert cli_main(["inspect", str(xl), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["experts"]["0"]["path"] == str(adapter.resolve()) and info["experts"]["0"]["inside"] is False
        assert info["experts"]["1"]["path"] == str((tmp_path / "elsewhere").resolve())
    with cases("inspect text"):
        capsys.readouterr()
        assert cli_main(["inspect", str(xl)]) == 0
        out = capsys.readouterr().out
        assert f"at {adapter.resolve()} (OUTSIDE the directory)" in out
    with cases("convert prints origins"):
        code, err = _cli(capsys, "convert", xl, tmp_path / "o1", "--to", "peft", "--base", base)
        assert code == 0 and f"expert '0': {adapter.resolve()} (OUTSIDE" in err
    for cmd in ("inspect", "convert"):
        with cases(f"{cmd} --confine-experts"):
            argv = [cmd, xl, "--confine-experts"] + ([tmp_path / "o2", "--to", "peft"] if cmd == "convert" else [])
            code, err = _cli(capsys, *argv)
            _one_line_error(code, err, "outside the directory", "--confine-experts")
            assert not (tmp_path / "o2").exists()
    with cases("confined experts pass"):
        inside = _xlora_dir(tmp_path / "in", {"0": "0", "1": "1"})
        for name in ("0", "1"):
            _copy_dir(adapter, inside / name)
        code, err = _cli(capsys, "convert", inside, tmp_path / "o3", "--to", "peft", "--confine-experts")
        assert code == 0 and "(inside" in err
    cases.done()


# -- the multi-rank atomic directory ------------------------------------------------------------------


def _shared_body(rank, world, root):
    from megatron_lora import LoraConfig, apply_lora, init_distributed, save_adapter
    from megatron_lora.model.gpt import build_gpt, gpt_config

    init_distributed(world)
    model = build_gpt(gpt_config(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                 tensor_model_parallel_size=world), 64)
    config = LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    apply_lora(model, config)
    os.umask(0o022)
    save_adapter(model, Path(root) / "a", config)
    errors = []
    for target in ("a", "file/x"):  # exists; parent is a file: every rank must raise, none may hang
        if target == "file/x" and rank == 0:
            (Path(root) / "file").write_text("x")
        torch.distributed.barrier()
        try:
            save_adapter(model, Path(root) / target, config)
        except OSError as e:
            errors.append(type(e).__name__)
    return {"errors": errors, "modes": sorted(_modes(Path(root) / "a")), "left": leftovers(Path(root))}


def test_shared_atomic_directory(tmp_path):
    from dist import run_ranks

    out = run_ranks(_shared_body, 2, str(tmp_path))
    for r in out:
        assert r["errors"] == ["FileExistsError", "NotADirectoryError"]
        assert r["modes"] == [("dir", 0o755), ("file", 0o644)] and r["left"] == []
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json", "tp_rank_00.safetensors", "tp_rank_01.safetensors"]
