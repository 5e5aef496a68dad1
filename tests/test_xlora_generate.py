"""X-LoRA generation, scalings plots and X-LoRA fine-tuning.

The oracle is PEFT 0.21.2's XLoraModel on a tiny random HF Llama (hidden 64, 2 layers,
8 heads / 2 kv heads, vocab 128) with three PEFT LoRA experts (non-zero B, different
targets and ranks) and a random layerwise depth-2 classifier with top-k, written in the
intended PEFT X-LoRA layout. KV-cache decoding is checked against full recomputation
(the X-LoRA forward on the growing sequence) at TP=1 and TP=2 in one spawned group.
Tolerance: max |diff| <= 1e-5 x max |logit| (fp32); scalings relative to their own scale.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist import run_ranks
from oracle import TOL, save_random_peft_lora

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [3, 17, 42, 99, 5, 64, 127, 8, 0, 31]
NEW = 5
#: (r, lora_alpha, target_modules) of each expert.
EXPERTS = [(4, 8, ["q_proj", "v_proj", "down_proj"]), (2, 4, ["k_proj", "o_proj", "up_proj"]),
           (3, 6, ["q_proj", "gate_proj", "down_proj"])]
CASE = dict(xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0, layerwise_scalings=True, top_k_lora=2,
            softmax_temperature=0.7)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The HF base, a PEFT X-LoRA directory (intended layout), a megatron one at TP=2, and
    PEFT's logits and logged scalings on the prompt."""
    from peft import XLoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lora.formats.convert import base_facts
    from megatron_lora.model.xlora import XLoraConfig as OurConfig
    from megatron_lora.formats.xlora import XLoraBundle, write_megatron_xlora, write_peft_xlora

    root = tmp_path_factory.mktemp("xlora_gen")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, use_cache=False)
    base = LlamaForCausalLM(cfg).float().eval()
    base.save_pretrained(root / "base")
    experts = {}
    for i, (r, alpha, targets) in enumerate(EXPERTS):
        save_random_peft_lora(base, root / f"expert{i}", 10 + i, 0.3, r=r, lora_alpha=alpha, target_modules=targets)
        experts[str(i)] = str(root / f"expert{i}")
    pm = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters=experts, **CASE)).eval()
    gen = torch.Generator().manual_seed(5)
    linears = [m for m in pm.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for m in linears:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
        logits = pm(input_ids=torch.tensor([PROMPT])).logits[0]
    scalings = pm.get_latest_scalings()[0]
    bundle = XLoraBundle(OurConfig(hidden_size=64, adapters=experts, **CASE),
                         [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears],
                         {k: Path(v) for k, v in experts.items()})
    write_peft_xlora(bundle, root / "peft_xlora")
    write_megatron_xlora(bundle, root / "megatron_xlora", tp=2, facts=base_facts(root / "base"))
    return {"root": root, "base": str(root / "base"), "peft": str(root / "peft_xlora"),
            "megatron": str(root / "megatron_xlora"), "logits": logits, "scalings": scalings}


@pytest.fixture(scope="module")
def finetuned(dirs):
    """scripts/finetune.py --xlora at TP=2 on the HF base with its own random experts."""
    out = dirs["root"] / "finetuned"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "finetune.py"), "--xlora", "--tiny", "--tp", "2", "--base", dirs["base"],
           "--steps", "12", "--seq-length", "16", "--global-batch-size", "8", "--lr", "1e-2",
           "--save", str(dirs["root"] / "finetune-run"), "--export-peft", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.findall(r"start loss ([0-9.]+) -> final loss ([0-9.]+)", proc.stdout)
    assert len(found) == 1, proc.stdout[-2000:]
    return {"dir": out, "start": float(found[0][0]), "final": float(found[0][1])}


def _generate(argv: list[str], **changes):
    """``megatron-lora generate ARGV`` in this process (with option ``changes``); the new tokens."""
    from megatron_lora.cli.generate import generate_from_dirs
    from megatron_lora.cli.main import build_parser

    options = {k: v for k, v in vars(build_parser().parse_args(["generate", *argv])).items()
               if k not in ("func", "command")}
    return generate_from_dirs(**{**options, **changes})


def _decode_checks(xm) -> dict:
    """KV-cache decoding (both modes) against recomputation on the growing sequence."""
    from megatron_lora.runtime.generation import forward_logits, generate
    from megatron_lora.model.gpt import positions_for

    calls = []
    hook = xm.model.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[1]))
    tokens, steps = generate(xm, PROMPT, NEW, output_logits=True)
    once_calls = len(calls)
    once_tokens, once_steps = generate(xm, PROMPT, NEW, output_logits=True, xlora_scalings_once=True)
    hook.remove()
    out = {"tokens": tokens, "once_tokens": once_tokens, "calls": calls[:once_calls], "once_calls": calls[once_calls:]}
    ids = PROMPT + tokens
    full = forward_logits(xm, torch.tensor([ids[:-1]]))[0, len(PROMPT) - 1:]  # the X-LoRA forward, no cache
    out["cache_vs_full"] = _rel(torch.stack(steps), full)
    out["greedy_is_argmax"] = tokens == full.argmax(-1).tolist()
    # Recomputation with the scalings fixed: prompt tokens keep theirs, new ones take the last prompt token's.
    prompt = torch.tensor([PROMPT])
    forward_logits(xm, prompt)
    prompt_scalings = xm.get_latest_scalings()
    ids = torch.tensor([PROMPT + once_tokens[:-1]])
    fixed = torch.cat([prompt_scalings, prompt_scalings[:, -1:].expand(-1, len(once_tokens) - 1, -1, -1)], 1)
    with torch.no_grad():
        local = xm(ids, positions_for(ids), None, fixed_scalings=fixed)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    once_full = gather_from_tensor_model_parallel_region(local)[0, len(PROMPT) - 1:, :128].float()
    out["once_vs_fixed"] = _rel(torch.stack(once_steps), once_full)
    out["once_argmax"] = once_tokens == once_full.argmax(-1).tolist()
    out["once_differs"] = _rel(torch.stack(once_steps)[1:], full[1:])
    return out


def _ranks_body(rank, world, d) -> dict:
    from megatron_lora import init_distributed
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.xlora import load_xlora

    out = {}
    for tp in (1, 2):
        init_distributed(tp)
        model, _ = load_hf_base(d["base"])
        out[tp] = _decode_checks(load_xlora(model, d["peft"]).eval())
        # The script's path: PEFT X-LoRA at TP=2, our TP=2 X-LoRA checkpoint at TP=1.
        adapter = d["peft"] if tp == 2 else d["megatron"]
        files = {k: str(Path(d["root"]) / f"{k}_tp{tp}.safetensors") for k in ("logits", "scalings")}
        argv = ["--base", d["base"], "--adapter", adapter, "--tp", str(tp),
                "--input-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW)]
        out[tp]["script_tokens"] = _generate(argv + ["--logits-out", files["logits"], "--scalings-out", files["scalings"]])
        out[tp]["script_once_tokens"] = _generate(argv + ["--xlora-scalings-once"])
    # The directory finetune.py --xlora saved, loaded by load_xlora (through generate).
    _generate(["--base", d["base"], "--adapter", d["finetuned"], "--tp", "2", "--input-ids",
               ",".join(map(str, PROMPT)), "--max-new-tokens", "1", "--logits-out",
               str(Path(d["root"]) / "finetuned_logits.safetensors")])
    return out


@pytest.fixture(scope="module")
def ranks(dirs, finetuned):
    d = {k: v for k, v in dirs.items() if isinstance(v, str)}
    d.update(root=str(dirs["root"]), finetuned=str(finetuned["dir"]))
    return run_ranks(_ranks_body, 2, d)


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cache_decoding_equals_recomputation(ranks, tp):
    r = ranks[0][tp]
    assert r["cache_vs_full"] <= TOL and r["greedy_is_argmax"], r["cache_vs_full"]
    assert r["once_vs_fixed"] <= TOL and r["once_argmax"], r["once_vs_fixed"]
    # Reusing the prompt's scalings is a different model from per-token scalings.
    assert r["once_differs"] > 1e-3, r["once_differs"]
    # Two single-token passes per new token (scaling pass, scaled pass); one with scalings once.
    assert r["calls"] == [len(PROMPT)] * 2 + [1] * 2 * (NEW - 1), r["calls"]
    assert r["once_calls"] == [len(PROMPT)] * 2 + [1] * (NEW - 1), r["once_calls"]
    assert ranks[1][tp]["tokens"] == r["tokens"] == ranks[0][1]["tokens"]
    assert r["script_tokens"] == r["tokens"] and r["script_once_tokens"] == r["once_tokens"]


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_and_scalings_out_match_peft(ranks, dirs, tp):
    root = dirs["root"]
    logits = load_file(str(root / f"logits_tp{tp}.safetensors"))["logits"]
    out = load_file(str(root / f"scalings_tp{tp}.safetensors"))
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPT), 128)
    assert _rel(logits, dirs["logits"]) <= TOL
    assert out["scalings"].dtype == torch.float32 and out["scalings"].shape == dirs["scalings"].shape == (len(PROMPT), 14, 3)
    assert _rel(out["scalings"], dirs["scalings"]) <= TOL
    assert out["input_ids"].tolist() == PROMPT


def test_plot_scalings_cli(ranks, dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_lora.cli.main import main

    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    scalings = str(dirs["root"] / "scalings_tp2.safetensors")
    for args in ([], ["--average", "--tokenizer", str(tmp_path / "tok")], ["--input-ids", ",".join(["1"] * len(PROMPT))]):
        png = tmp_path / f"plot{len(args)}.png"
        assert main(["plot-scalings", scalings, "-o", str(png), *args]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # Bad input: a clear one-line error, no file.
    assert main(["plot-scalings", scalings, "-o", str(tmp_path / "bad.png"), "--input-ids", "1,2"]) == 1
    assert main(["plot-scalings", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "bad.png")]) == 1
    assert not (tmp_path / "bad.png").exists()


def test_finetune_xlora_trains_and_saves_peft_layout(ranks, finetuned, dirs, monkeypatch):
    """Loss falls; the saved PEFT X-LoRA directory loads in PEFT and in ours to the same logits."""
    import json

    from peft import PeftModel
    from transformers import LlamaForCausalLM

    assert finetuned["final"] < finetuned["start"] - 0.02, finetuned
    out = finetuned["dir"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["adapters"] == {"0": "0", "1": "1", "2": "2"}
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2", "adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.chdir(out)  # PEFT resolves expert paths against the working directory
    pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(dirs["base"]).float(), str(out)).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor([PROMPT])).logits[0]
    ours = load_file(str(dirs["root"] / "finetuned_logits.safetensors"))["logits"]
    assert _rel(ours, ref) <= TOL
    assert _rel(ref, dirs["logits"]) > 1e-2  # a different mixture from the fixture's


def test_xlora_flags_need_an_xlora_adapter(dirs, tmp_path):
    from megatron_lora.cli.generate import generate_from_dirs

    for flags in ({"scalings_out": str(tmp_path / "s.safetensors")}, {"xlora_scalings_once": True}):
        with pytest.raises(ValueError, match="need an X-LoRA --adapter"):
            generate_from_dirs(dirs["base"], input_ids="1,2", adapter=str(dirs["root"] / "expert0"), **flags)
    assert not (tmp_path / "s.safetensors").exists()
