"""`megatron-lora convert` and `inspect` on X-LoRA directories (run in-process via cli.main).

Inputs: the tiny Llama and three PEFT LoRA experts of test_xlora, an X-LoRA directory written
by peft 0.21.2's own save (classifier entries misplaced), the same adapter in the intended
PEFT layout and in the original xlora package's layout. Conversions must keep every tensor
bit for bit; bad input must fail with a clear error and leave nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lora.formats.checkpoint import ShardReader, shard_file
from megatron_lora.cli.main import main as cli_main
from megatron_lora.formats.peft import read_peft_config
from megatron_lora.model.xlora import XLoraConfig
from megatron_lora.formats.xlora import PEFT_CLASSIFIER, XLoraBundle, read_xlora, write_peft_xlora
from test_convert import leftovers, resolved
from test_xlora import CASES, EXPERTS, GRAD_CASE, N_LAYERS, _peft_case, dirs  # noqa: F401 (dirs: fixture)

CASE = CASES[GRAD_CASE]  # depth 2 with dropout: Sequential indices 0 and 3; layerwise
WEIGHTS = "adapter_model.safetensors"


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_classifier(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.fixture(scope="module")
def src(dirs, tmp_path_factory):
    """PEFT's own save, the intended PEFT layout and the xlora package layout of one adapter."""
    root = tmp_path_factory.mktemp("xlora_cli")
    classifier = _peft_case(dirs, CASE, seed=7, save_to=root / "peft_saved")["classifier"]
    experts = {k: Path(v) for k, v in dirs["experts"].items()}
    write_peft_xlora(XLoraBundle(XLoraConfig(hidden_size=64, adapters=dirs["experts"], **CASE), classifier, experts),
                     root / "intended")
    package = root / "package"
    package.mkdir()
    (package / "xlora_config.json").write_text(json.dumps(
        {"hidden_size": 64, "device": "cpu", "use_bias": True, "enable_relu_and_dropout": True,
         "adapters": dirs["experts"], **CASE}))
    (w0, b0), (w1, b1) = classifier
    save_file({"inner.0.weight": w0, "inner.0.bias": b0, "last.weight": w1, "last.bias": b1},
              str(package / "xlora_classifier.safetensors"))
    return {"root": root, "base": dirs["base"], "experts": experts, "classifier": classifier,
            "peft_saved": root / "peft_saved", "intended": root / "intended", "package": package}


def _convert(*argv) -> int:
    return cli_main(["convert", *map(str, argv)])


def test_peft_megatron_peft_round_trip(src, tmp_path):
    meg, back = tmp_path / "meg2", tmp_path / "back"
    assert _convert(src["intended"], meg, "--to", "megatron", "--tp", "2", "--base", src["base"]) == 0
    config = json.loads((meg / "adapter_config.json").read_text())
    assert (config["kind"], config["tp_size"], config["n_layers"]) == ("xlora", 2, N_LAYERS)
    # Classifier sharded: each rank holds half of every weight (biases of row-parallel linears replicated).
    full_weights = sum(w.numel() for w, _ in src["classifier"])
    for j in range(2):
        shard = load_file(str(shard_file(meg, j)))
        assert sum(t.numel() for k, t in shard.items() if k.endswith("weight")) * 2 == full_weights
    for i in range(len(EXPERTS)):
        assert ShardReader(meg / "experts" / str(i)).saved_tp == 2
    assert _same_classifier(read_xlora(meg).classifier, src["classifier"])

    assert _convert(meg, back, "--to", "peft") == 0
    orig, new = src["intended"], back
    assert _same_tensors(load_file(str(orig / WEIGHTS)), load_file(str(new / WEIGHTS)))
    config = json.loads((orig / "adapter_config.json").read_text())
    assert config == json.loads((new / "adapter_config.json").read_text())
    for i in range(len(EXPERTS)):
        a, b = orig / str(i), new / str(i)
        assert _same_tensors(load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))), i
        assert resolved(read_peft_config(a)) == resolved(read_peft_config(b)), i
    assert leftovers(tmp_path) == []


def test_megatron_reshard(src, tmp_path):
    meg2, meg1 = tmp_path / "meg2", tmp_path / "meg1"
    assert _convert(src["intended"], meg2, "--to", "megatron", "--tp", "2", "--base", src["base"]) == 0
    assert _convert(meg2, meg1, "--to", "megatron", "--tp", "1") == 0
    assert json.loads((meg1 / "adapter_config.json").read_text())["tp_size"] == 1
    assert _same_classifier(read_xlora(meg1).classifier, src["classifier"])
    classifier_tp1 = load_file(str(shard_file(meg1, 0)))
    assert [tuple(classifier_tp1[f"xlora_classifier.linears.{k}.weight"].shape) for k in (0, 1)] == [
        tuple(w.shape) for w, _ in src["classifier"]]
    for i in range(len(EXPERTS)):
        two, one = ShardReader(meg2 / "experts" / str(i)), load_file(str(shard_file(meg1 / "experts" / str(i), 0)))
        assert one.keys() == set(two.keys()) and all(torch.equal(one[k], two.full(k)) for k in one)
    # Without --tp the source's TP size is kept.
    assert _convert(meg1, tmp_path / "same", "--to", "megatron") == 0
    assert read_xlora(tmp_path / "same").saved_tp == 1


def test_peft_save_layout_to_intended(src, tmp_path):
    saved = src["peft_saved"]
    top = load_file(str(saved / WEIGHTS))
    assert f"{PEFT_CLASSIFIER}.0.weight" not in top  # PEFT's save misplaced linear 0 into expert "0"
    assert _convert(saved, tmp_path / "fixed", "--to", "peft") == 0
    fixed = tmp_path / "fixed"
    assert _same_tensors(load_file(str(fixed / WEIGHTS)), load_file(str(src["intended"] / WEIGHTS)))
    for i, expert in enumerate(src["experts"].values()):  # the real experts, not PEFT's mixed subfolders
        assert _same_tensors(load_file(str(fixed / str(i) / WEIGHTS)), load_file(str(expert / WEIGHTS)))
    # The original xlora package's layout converts to the same directory.
    assert _convert(src["package"], tmp_path / "from_package", "--to", "peft") == 0
    assert _same_tensors(load_file(str(tmp_path / "from_package" / WEIGHTS)), load_file(str(fixed / WEIGHTS)))


def test_inspect(src, tmp_path, capsys):
    meg = tmp_path / "meg2"
    assert _convert(src["package"], meg, "--to", "megatron", "--tp", "2", "--base", src["base"]) == 0
    capsys.readouterr()
    n_classifier = sum(w.numel() + b.numel() for w, b in src["classifier"])
    n_experts = sum(t.numel() for e in src["experts"].values() for t in load_file(str(e / WEIGHTS)).values())
    formats = {"peft_saved": "peft-0.21.2-save", "intended": "peft-xlora", "package": "xlora-package"}
    for name, fmt in formats.items():
        assert cli_main(["inspect", str(src[name]), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["format"], info["kind"], info["tp_size"]) == (fmt, "xlora", 1)
        assert info["parameters"] == {"classifier": n_classifier, "experts": n_experts}

    assert cli_main(["inspect", str(meg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["tp_size"], info["n_layers"], info["n_experts"]) == ("megatron-xlora", 2, N_LAYERS, 3)
    assert info["classifier"]["shapes"] == [[32, 64], [N_LAYERS * 3, 32]]
    assert info["parameters"] == {"classifier": n_classifier, "experts": n_experts}
    for name, (r, alpha, targets, extra) in zip(info["experts"], EXPERTS):
        e = info["experts"][name]
        assert (e["format"], e["tp_size"]) == ("megatron-lora", 2)
        assert sorted(e["target_modules"]) == sorted(targets)
        assert e["segments"]["q_proj" if "q_proj" in targets else "v_proj"]["r"] == [r]
    assert info["experts"]["2"]["segments"]["down_proj"] == {"layers": [1], "r": [5], "lora_alpha": [6]}

    assert cli_main(["inspect", str(meg)]) == 0
    out = capsys.readouterr().out
    for fact in ("format:       megatron-xlora", "kind:         xlora", "tp size:      2",
                 f"n_layers {N_LAYERS} x n_experts 3", "depth 2, size 32, dropout 0.2",
                 "layerwise_scalings True", "softmax_temperature 0.5", "top_k_lora 2",
                 f"classifier {n_classifier:,}, experts {n_experts:,}", "expert '2':",
                 "down_proj    layers 1  r [5]  lora_alpha [6]"):
        assert fact in out, fact


def test_bad_input(src, tmp_path, capsys):
    def fails(source, match, *extra, dst=tmp_path / "out"):
        assert _convert(source, dst, *extra) == 1
        assert match in capsys.readouterr().err
        assert not dst.exists() and leftovers(dst.parent) == []

    # Experts disagreeing with the config: the config lists two, the classifier was made for three.
    two = shutil.copytree(src["intended"], tmp_path / "two")
    config = json.loads((two / "adapter_config.json").read_text())
    config["adapters"].pop("2")
    (two / "adapter_config.json").write_text(json.dumps(config))
    fails(two, f"do not fit n_layers={N_LAYERS} x n_experts=2", "--to", "megatron", "--base", src["base"])
    fails(two, f"do not fit n_layers={N_LAYERS} x n_experts=2", "--to", "peft")
    assert cli_main(["inspect", str(two)]) == 1 and "n_experts=2" in capsys.readouterr().err

    # A corrupt classifier file (PEFT top-level file; a Megatron rank file).
    corrupt = shutil.copytree(src["intended"], tmp_path / "corrupt")
    (corrupt / WEIGHTS).write_bytes((corrupt / WEIGHTS).read_bytes()[:100])
    fails(corrupt, "is not a readable safetensors file", "--to", "megatron", "--base", src["base"])
    meg = tmp_path / "meg"
    assert _convert(src["intended"], meg, "--to", "megatron", "--tp", "2", "--base", src["base"]) == 0
    shard_file(meg, 1).write_bytes(b"\x00" * 16)
    fails(meg, "tp_rank_01.safetensors is not a readable safetensors file", "--to", "peft")

    fails(src["intended"], "(--base) are needed", "--to", "megatron")  # PEFT experts need the base
    fails(src["intended"], "does not divide the classifier's xlora_size=32", "--to", "megatron", "--tp", "3", "--base", src["base"])
    fails(src["intended"], "--verify runs LoRA adapters only", "--to", "megatron", "--base", src["base"], "--verify")
    assert _convert(src["intended"], meg, "--to", "peft") == 1 and "already exists" in capsys.readouterr().err
    assert shard_file(meg, 1).read_bytes() == b"\x00" * 16  # untouched
