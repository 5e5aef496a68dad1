"""PEFT <-> Megatron adapter conversion: bit-exact round trips, logits against HF + PEFT, bad input, CLI.

Tolerance for logits (fp32): max |diff| <= 1e-5 x max |logit|.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lora.formats.checkpoint import shard_file
from megatron_lora.cli.main import main as cli_main
from megatron_lora.config import LoraConfig
from megatron_lora.cli.convert import verify
from megatron_lora.formats.convert import base_facts, convert, describe
from megatron_lora.hf.layout import HF_PROJECTIONS, hf_module_name
from megatron_lora.formats.peft import megatron_to_peft, peft_to_megatron, read_peft_config, reshard

from dist import run_ranks

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
ALL7 = list(HF_PROJECTIONS)
SHARED = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
VARIANTS = {
    "all7": dict(target_modules=ALL7),
    "qv": dict(target_modules=["q_proj", "v_proj"]),
    "patterns": dict(target_modules=ALL7, rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"gate_proj": 3, "o_proj": 5}),
    "rslora": dict(target_modules=["q_proj", "o_proj", "up_proj"], use_rslora=True, lora_alpha=6),
    "layers": dict(target_modules=["k_proj", "gate_proj", "down_proj"], layers_to_transform=[1]),
    "all_linear": dict(target_modules="all-linear"),
}


def _hf_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=128, rms_norm_eps=1e-6)
    return LlamaConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "base"
    LlamaForCausalLM(_hf_config()).save_pretrained(path)
    return path


def _hf_model(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


def make_peft(base: Path, out: Path, seed: int = 1, **lora) -> Path:
    """A PEFT adapter with non-zero B (init_lora_weights=False)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_hf_model(base), PeftLoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora}))
    model.save_pretrained(out)
    return out


def hf_peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(_hf_model(base), str(adapter)).eval()(input_ids=ids).logits


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def resolved(config: LoraConfig, layers: int = 2) -> dict[str, tuple]:
    """What a config means: adapted HF module -> (r, alpha), plus rsLoRA."""
    out = {"use_rslora": config.use_rslora}
    for i in range(layers):
        for p in HF_PROJECTIONS:
            name = hf_module_name(i, p)
            if config.matches(name, i):
                out[name] = config.rank_alpha(name)
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact(base, tmp_path, variant):
    peft_dir = make_peft(base, tmp_path / "peft", **VARIANTS[variant])
    facts = base_facts(base)
    convert(peft_dir, tmp_path / "tp2", "megatron", facts=facts, tp=2, progress=False)
    convert(tmp_path / "tp2", tmp_path / "back", "peft", facts=facts, progress=False)

    original, back = tensors(peft_dir / "adapter_model.safetensors"), tensors(tmp_path / "back/adapter_model.safetensors")
    assert sorted(original) == sorted(back)
    for k in original:
        assert original[k].dtype == back[k].dtype and torch.equal(original[k], back[k]), k
    # Equivalent config: the same modules with the same rank and alpha, loadable by PEFT.
    from peft import LoraConfig as PeftLoraConfig

    peft_back = PeftLoraConfig.from_pretrained(str(tmp_path / "back"))
    assert peft_back.peft_type.value == "LORA" and peft_back.task_type == "CAUSAL_LM"
    assert resolved(read_peft_config(tmp_path / "back")) == resolved(read_peft_config(peft_dir))
    back_cfg = json.loads((tmp_path / "back/adapter_config.json").read_text())
    assert back_cfg["r"] == 4 and back_cfg["use_rslora"] == VARIANTS[variant].get("use_rslora", False)
    assert isinstance(back_cfg["target_modules"], list) and set(back_cfg["target_modules"]) <= set(ALL7)

    # TP 2 -> 1 -> 2 reshard is bit-exact; rank files really hold halves.
    convert(tmp_path / "tp2", tmp_path / "tp1", "megatron", tp=1, progress=False)
    convert(tmp_path / "tp1", tmp_path / "tp2b", "megatron", tp=2, progress=False)
    for j in range(2):
        a, b = tensors(shard_file(tmp_path / "tp2", j)), tensors(shard_file(tmp_path / "tp2b", j))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    tp1 = tensors(shard_file(tmp_path / "tp1", 0))
    tp2 = tensors(shard_file(tmp_path / "tp2", 1))
    for k, t in tp1.items():
        if ".lora_B." in k and ".linear_qkv." in k:  # column B: rank 1 holds the second half
            assert torch.equal(tp2[k], t.chunk(2, 0)[1])
        if ".lora_A." in k and ".linear_fc2." in k:  # row A: rank 1 holds the second column half
            assert torch.equal(tp2[k], t.chunk(2, 1)[1])

    # The in-memory functions give the same tensors as the disk conversions.
    cfg, ranks = peft_to_megatron(peft_dir, facts, 2)
    assert cfg["tp_size"] == 2
    for j, rank in enumerate(ranks):
        disk = tensors(shard_file(tmp_path / "tp2", j))
        assert sorted(rank) == sorted(disk) and all(torch.equal(rank[k], disk[k]) for k in rank)
    _, ranks1 = reshard(tmp_path / "tp2", 1)
    assert all(torch.equal(t, tp1[k]) for k, t in next(ranks1).items())
    peft_cfg, mem = megatron_to_peft(tmp_path / "tp2", facts)
    assert peft_cfg["peft_type"] == "LORA" and all(torch.equal(mem[k], original[k]) for k in original)


# -- logits against HF + PEFT (TP=1 in process, TP=2 on spawned ranks) -------------------------


def _tp2_body(rank, world, base, peft_dir, tp2_dir, shared_dir, ids):
    from megatron_lora import LoraConfig as Cfg
    from megatron_lora import apply_lora, init_distributed, save_adapter
    from megatron_lora.runtime.generation import forward_logits
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.adapters import load_adapter

    init_distributed(world, seed=7)
    out = {}
    for name, directory in (("peft", peft_dir), ("megatron", tp2_dir)):
        model, _ = load_hf_base(base)
        load_adapter(model, directory)
        out[name] = forward_logits(model, ids)
    # A shared-A adapter (Megatron names), trained-like random factors, saved at TP=2.
    model, _ = load_hf_base(base)
    cfg = Cfg(r=4, lora_alpha=8, target_modules=SHARED, init_lora_weights=False,
              rank_pattern={"linear_fc1": 2}, alpha_pattern={"linear_qkv": 3})
    apply_lora(model, cfg)
    out["shared"] = forward_logits(model, ids)
    save_adapter(model, shared_dir, cfg)
    return out


def test_logits_match_hf_peft(base, tmp_path):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    peft_dir = make_peft(base, tmp_path / "peft", **VARIANTS["patterns"])
    facts = base_facts(base)
    convert(peft_dir, tmp_path / "tp2", "megatron", facts=facts, tp=2, progress=False)
    convert(tmp_path / "tp2", tmp_path / "back", "peft", progress=False)
    oracle = hf_peft_logits(base, peft_dir, ids)
    scale = oracle.abs().max().item()

    # The PEFT reload of the round-tripped adapter gives the same logits.
    assert torch.equal(hf_peft_logits(base, tmp_path / "back", ids), oracle)
    out = run_ranks(_tp2_body, 2, str(base), str(peft_dir), str(tmp_path / "tp2"), str(tmp_path / "shared"), ids)
    for r in out:
        for name in ("peft", "megatron"):
            diff = (r[name] - oracle).abs().max().item()
            assert diff <= TOL * scale, (name, diff, scale)

    # Shared-A export: A duplicated, B split; HF + PEFT then computes what our model did.
    convert(tmp_path / "shared", tmp_path / "shared_peft", "peft", progress=False)
    exported = hf_peft_logits(base, tmp_path / "shared_peft", ids)
    ours = out[0]["shared"]
    assert (exported - ours).abs().max().item() <= TOL * ours.abs().max().item()
    assert (ours - hf_peft_logits(base, peft_dir, ids)).abs().max().item() > 1e-2  # a real adapter
    t = tensors(tmp_path / "shared_peft/adapter_model.safetensors")
    q, k = (t[f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_A.weight"] for p in "qk")
    assert torch.equal(q, k) and t["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"].shape[0] == 2
    # The shared adapter also round-trips through PEFT back into our layout at TP=1 exactly.
    diff, scale1 = verify(base, tmp_path / "shared_peft", tmp_path / "shared")
    assert diff <= TOL * scale1


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return make_peft(base, tmp_path_factory.mktemp("ad") / "peft", target_modules=ALL7)


def _copy_peft(src: Path, dst: Path, config_update: dict | None = None, tensors_update: dict | None = None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config_update or {})}))
    save_file({**tensors(src / "adapter_model.safetensors"), **(tensors_update or {})}, str(dst / "adapter_model.safetensors"))
    return dst


def _base_with(tmp_path: Path, base: Path, **changes) -> Path:
    other = tmp_path / "other_base"
    other.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, **changes}))
    return other


def _expect_error(tmp_path, src, exc, match, facts=None, tp=2, to="megatron"):
    before = leftovers(tmp_path)
    with pytest.raises(exc, match=match):
        convert(src, tmp_path / "out", to, facts=facts, tp=tp, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == before


def test_bad_input(base, adapter, tmp_path):
    facts = base_facts(base)
    # Adapter made for another base: names the module and both shapes.
    other = base_facts(_base_with(tmp_path, base, intermediate_size=128))
    _expect_error(tmp_path, adapter, ValueError,
                  r"another base: model\.layers\.0\.mlp\.gate_proj has lora_A \[4, 64\] / lora_B \[96, 4\].*"
                  r"needs lora_A \[r, 64\] / lora_B \[128, r\]",
                  facts=other)
    # Missing files.
    _expect_error(tmp_path, tmp_path / "nope", FileNotFoundError, "does not exist", facts=facts)
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path, tmp_path / "empty", FileNotFoundError, "holds no adapter_config.json", facts=facts)
    no_weights = _copy_peft(adapter, tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    _expect_error(tmp_path, no_weights, FileNotFoundError, "adapter_model.safetensors does not exist", facts=facts)
    convert(adapter, tmp_path / "meg", "megatron", facts=facts, tp=2, progress=False)
    (tmp_path / "meg_missing").mkdir()
    for name in ("adapter_config.json", "tp_rank_00.safetensors"):
        (tmp_path / "meg_missing" / name).write_bytes((tmp_path / "meg" / name).read_bytes())
    _expect_error(tmp_path, tmp_path / "meg_missing", FileNotFoundError, "tp_rank_01.safetensors is missing", to="peft")
    # Corrupt and truncated safetensors.
    truncated = _copy_peft(adapter, tmp_path / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, truncated, ValueError, "is not a readable safetensors file", facts=facts)
    (tmp_path / "meg" / "tp_rank_01.safetensors").write_bytes(b"\x00garbage" * 10)
    _expect_error(tmp_path, tmp_path / "meg", ValueError, r"tp_rank_01\.safetensors is not a readable", to="peft")
    # TP not dividing heads, query groups or ffn.
    _expect_error(tmp_path, adapter, ValueError, "does not divide num_attention_heads=8", facts=facts, tp=3)
    _expect_error(tmp_path, adapter, ValueError, "does not divide num_query_groups=2", facts=facts, tp=4)
    odd_ffn = base_facts(_base_with(tmp_path / "empty", base, intermediate_size=99))
    _expect_error(tmp_path, adapter, ValueError, "does not divide ffn_hidden_size=99", facts=odd_ffn, tp=2)
    # PEFT options we cannot represent.
    for i, (update, match) in enumerate([
        ({"use_dora": True}, r"has no matching lora_magnitude_vector \(use_dora is true\)"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
        ({"lora_bias": True}, "unsupported LoRA config field lora_bias=True"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
        ({"target_modules": ["embed_tokens"]}, "which the config does not adapt"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported"),
        ({"peft_type": "LOHA"}, "peft_type='LOHA' is not a LoRA or X-LoRA adapter"),
    ]):
        _expect_error(tmp_path, _copy_peft(adapter, tmp_path / f"opt{i}", update), ValueError, match, facts=facts)
    embedding = _copy_peft(adapter, tmp_path / "embedding", tensors_update={
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)})
    _expect_error(tmp_path, embedding, ValueError, "embed_tokens.lora_embedding_A' has no matching lora_B", facts=facts)
    misnamed = _copy_peft(adapter, tmp_path / "misnamed", tensors_update={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A": torch.zeros(4, 64)})
    _expect_error(tmp_path, misnamed, ValueError, "PEFT names it .*q_proj.lora_A.weight", facts=facts)
    dora = _copy_peft(adapter, tmp_path / "dora", tensors_update={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.zeros(64)})
    _expect_error(tmp_path, dora, ValueError, "is a DoRA magnitude, but use_dora is false", facts=facts)
    # An existing output directory is kept unless overwrite.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(adapter, tmp_path / "out", "megatron", facts=facts, tp=2, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    convert(adapter, tmp_path / "out", "megatron", facts=facts, tp=2, overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "tp_rank_01.safetensors").is_file()


# -- command line ---------------------------------------------------------------------------------


def test_cli(base, adapter, tmp_path, capsys):
    for argv in (["--help"], ["convert", "--help"], ["inspect", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0
    assert "--overwrite" in capsys.readouterr().out
    assert cli_main(["convert", str(adapter), str(tmp_path / "x"), "--to", "peft", "--base", str(base)]) == 1
    assert "already a PEFT LoRA directory" in capsys.readouterr().err

    convert(adapter, tmp_path / "meg", "megatron", facts=base_facts(base), tp=2, progress=False)
    assert cli_main(["convert", str(adapter), str(tmp_path / "meg"), "--to", "megatron", "--base", str(base)]) == 1
    assert "already exists" in capsys.readouterr().err

    # The command and both scripts as processes (run side by side: each start imports torch).
    # Extend PYTHONPATH: replacing it loses packages installed through it (a --target install).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    meg, back = tmp_path / "meg", tmp_path / "back"
    procs = [
        subprocess.Popen([sys.executable, *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in (
            ["-m", "megatron_lora.cli", "inspect", str(meg)],
            [str(REPO / "scripts/convert_megatron_to_peft.py"), "--megatron", str(meg), "--base", str(base),
             "--out", str(back)],
            [str(REPO / "scripts/convert_peft_to_megatron.py"), "--peft", str(adapter), "--base", str(base),
             "--tp", "2", "--out", str(tmp_path / "meg2")],
        )
    ]
    (inspect_out, _), (_, back_err), (_, meg2_err) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], (back_err, meg2_err)
    n_params = sum(t.numel() for t in tensors(adapter / "adapter_model.safetensors").values())
    assert "megatron-lora" in inspect_out and "tp size:      2" in inspect_out
    assert f"parameters:   {n_params:,}" in inspect_out
    assert "q_proj       layers 0-1  r [4]  lora_alpha [8]" in inspect_out
    assert "tensor" in meg2_err  # the progress bar
    original = tensors(adapter / "adapter_model.safetensors")
    assert all(torch.equal(t, original[k]) for k, t in tensors(back / "adapter_model.safetensors").items())
    for j in range(2):
        a, b = tensors(shard_file(meg, j)), tensors(shard_file(tmp_path / "meg2", j))
        assert all(torch.equal(a[k], b[k]) for k in a)
    info = describe(back)
    assert info["format"] == "peft-lora" and info["parameters"] == n_params
