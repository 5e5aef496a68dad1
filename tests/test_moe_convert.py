"""PEFT's two mixture-of-experts adapter layouts <-> our per-expert checkpoint (Qwen3-MoE, Mixtral).

* fused (transformers 5, ``target_parameters``): saved by PEFT itself; per-expert (transformers 4
  module names): written by hand, as transformers 5 cannot build those modules, and loaded by
  PEFT through its own transformers-4 conversion.
* The interleaving rule is checked against PEFT: the HF model with deltas merged from OUR
  per-expert factors (scalings the test chose) gives the logits of HF + the PEFT adapter, and
  PEFT's own per-expert delta equals ours.
* Round trips are bit-exact: each layout through our checkpoint at TP=1 and TP=2 and back, and
  across layouts (per-expert -> fused -> per-expert, fused -> per-expert -> fused); and through
  models at EP=2 and at expert TP=2 (load, save, export).
* Those models, and generate.py under torchrun, give HF + PEFT's logits and greedy tokens on a
  prompt without router near-ties.

Tolerance for logits (fp32): max |diff| <= 1e-5 x max |logit|.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lora.cli.main import main as cli_main
from megatron_lora.formats.checkpoint import ShardReader, split_key
from megatron_lora.formats.convert import base_expert_names, base_facts, convert
from megatron_lora.formats.peft import PeftReader
from megatron_lora.hf.layout import hf_module_name, parse_moe_module

from dist import run_ranks
from test_moe_import import COMMON, _perturbed, _prompt

TOL = 1e-5
E, FFN, R = 4, 48, 4
#: PEFT's transformers-4 module names (block, gate, up, down) per model type.
V4 = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"), "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
#: The fused adapter: experts and router through target_parameters, attention through target_modules;
#: down_proj at another rank and gate_up_proj at another alpha, found by PEFT's patterns on parameter names.
FUSED = dict(r=R, lora_alpha=8, target_modules=["q_proj", "o_proj"],
             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
             rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 6})


def _models():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return {
        # Layer 1 is a dense MLP: its gate_proj is no expert's.
        "qwen3_moe": Qwen3MoeForCausalLM(Qwen3MoeConfig(num_experts=E, moe_intermediate_size=FFN, intermediate_size=80,
                                                        norm_topk_prob=True, mlp_only_layers=[1], **COMMON)),
        "mixtral": MixtralForCausalLM(MixtralConfig(num_local_experts=E, intermediate_size=FFN, **COMMON)),
    }


def _save_fused(hf, path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(init_lora_weights=False, **FUSED))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.3)
    pm.save_pretrained(path)


def _save_per_expert(model_type: str, moe_layers: list[int], path: Path) -> None:
    """A transformers-4 PEFT adapter: every expert's three projections and the router, r=4, alpha=8."""
    block, *leaves = V4[model_type]
    g = torch.Generator().manual_seed(2)
    h = COMMON["hidden_size"]
    tensors = {}
    for layer in moe_layers:
        modules = [(f"{block}.gate", h, E)] + [
            (f"{block}.experts.{e}.{leaf}", *((FFN, h) if i == 2 else (h, FFN))) for e in range(E) for i, leaf in enumerate(leaves)]
        for name, fan_in, fan_out in modules:
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(R, fan_in, generator=g) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, R, generator=g) * 0.3
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    # layers_to_transform keeps a dense MLP (Qwen3-MoE's mlp_only_layers) out, whose gate_proj PEFT
    # would adapt too and, converting transformers 4 adapters, then drop.
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=R, lora_alpha=8, lora_dropout=0.0,
                  target_modules=[*leaves, "gate"], layers_to_transform=moe_layers)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_convert")
    out = {}
    for name, hf in _models().items():
        hf = _perturbed(hf)
        d = root / name
        hf.save_pretrained(d / "base")
        facts = base_facts(d / "base")
        _save_fused(hf, d / "fused")
        _save_per_expert(name, list(facts.moe.layers), d / "per_expert")
        out[name] = dict(dir=d, hf=hf, facts=facts, names=base_expert_names(d / "base"))
    return out


def _peft(hf, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()


def _merged(hf, ours: Path, scaling) -> torch.nn.Module:
    """``hf`` with the deltas of OUR checkpoint's factors merged (scaling(module, segment) from the
    test): each expert's [gate; up] rows and down rows of the fused parameters, the router, q / o."""
    reader = ShardReader(ours)
    model = copy.deepcopy(hf)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in reader.keys():
            module, factor, seg = split_key(key)
            if factor != "lora_A":
                continue
            delta = scaling(module, seg) * reader.full(key.replace(".lora_A.", ".lora_B.")) @ reader.full(key)
            moe = parse_moe_module(module)
            if moe is None:  # decoder.layers.{i}.self_attention.linear_qkv, segment q_proj
                params[f"{hf_module_name(int(module.split('.')[2]), seg)}.weight"] += delta
                continue
            layer, e, kind = moe.layer, moe.expert, moe.module
            mlp = model.model.layers[layer].mlp
            if kind == "router":
                mlp.gate.weight += delta
            elif kind == "linear_fc2":
                mlp.experts.down_proj[e] += delta
            elif seg == "linear_fc1":  # [gate; up], as transformers 5 fuses them
                mlp.experts.gate_up_proj[e] += delta
            else:
                mlp.experts.gate_up_proj[e, (0 if seg == "gate_proj" else FFN):][:FFN] += delta
    return model.eval()


def _fused_scaling(module: str, seg: str) -> float:
    return {"linear_fc1": 6 / R, "linear_fc2": 8 / 2}.get(seg, 8 / R)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert diff <= TOL * scale, (diff, scale)


def _same_files(a: Path, b: Path, name: str = "adapter_model.safetensors") -> None:
    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    assert ta.keys() == tb.keys(), sorted(ta.keys() ^ tb.keys())[:4]
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_factors_match_peft(moe, model_type, tmp_path):
    """Our per-expert factors of either PEFT layout, merged into HF, give HF + PEFT's logits."""
    m = moe[model_type]
    hf, d = m["hf"], m["dir"]
    convert(d / "fused", tmp_path / "fused", "megatron", facts=m["facts"], progress=False)
    convert(d / "per_expert", tmp_path / "per_expert", "megatron", facts=m["facts"], progress=False)
    merged = {"fused": _merged(hf, tmp_path / "fused", _fused_scaling),
              "per_expert": _merged(hf, tmp_path / "per_expert", lambda module, seg: 8 / R)}
    ids = torch.tensor([_prompt({k: v for k, v in merged.items()})])
    base = _logits(hf, ids)
    for layout, model in merged.items():
        theirs = _logits(_peft(hf, d / layout), ids)
        assert (theirs - base).abs().max() > 0.1  # the adapter matters
        _close(_logits(model, ids), theirs)
    # PEFT's own delta of the fused gate_up_proj is ours expert by expert (a contiguous slice of B
    # instead of PEFT's interleaved columns fails this).
    wrapper = _peft(hf, d / "fused").base_model.model.model.layers[0].mlp.experts.base_layer
    assert wrapper.parameter_name == "gate_up_proj"
    theirs = wrapper.get_delta_weight("default")
    reader = ShardReader(tmp_path / "fused")
    for e in range(E):
        key = f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.lora_%s.linear_fc1"
        assert torch.allclose(theirs[e], 6 / R * reader.full(key % "B") @ reader.full(key % "A"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_round_trips_bit_exact(moe, model_type, tmp_path):
    m = moe[model_type]
    d, facts, names = m["dir"], m["facts"], m["names"]

    def to_ours(src, dst, tp=1):
        return convert(src, tmp_path / dst, "megatron", facts=facts, tp=tp, progress=False)

    def to_peft(src, dst, layout):
        return convert(src, tmp_path / dst, "peft", moe_layout=layout, expert_names=names, progress=False)

    for layout, flag in (("fused", "fused"), ("per_expert", "per-expert")):
        for tp in (1, 2):
            back = to_peft(to_ours(d / layout, f"{layout}_tp{tp}", tp), f"{layout}_tp{tp}_back", flag)
            _same_files(d / layout, back)
    ours_tp2 = ShardReader(tmp_path / "fused_tp2")
    key = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.lora_B.linear_fc1"
    assert ours_tp2.modules[key.rsplit(".lora_B", 1)[0]] == {"parallel": "column", "segments": {"linear_fc1": {"blocks": 2}}}
    assert ours_tp2.shape(key) == [FFN, R]  # rank j holds [gate_j; up_j]
    # Across layouts: a per-expert pair fuses block-diagonally (rank 2r, alpha 2 alpha) and splits
    # back; a shared-A fused LoRA exports per expert with A duplicated and fuses back.
    fused = to_peft(tmp_path / "per_expert_tp2", "pe_fused", "fused")
    cfg = json.loads((fused / "adapter_config.json").read_text())
    assert set(cfg["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"}
    assert PeftReader(fused, facts).shape("decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.lora_A.linear_fc1") == [2 * R, 64]
    _same_files(d / "per_expert", to_peft(to_ours(fused, "pe_fused_ours"), "pe_back", "per-expert"))
    per_expert = to_peft(tmp_path / "fused_tp1", "f_pe", "per-expert")
    f_back = to_peft(to_ours(per_expert, "f_pe_ours", 2), "f_back", "fused")
    _same_files(d / "fused", f_back)
    # The configs written say the same to PEFT. (Not checked on f_pe itself: PEFT's own
    # transformers-4 conversion drops the rank_pattern / alpha_pattern entries of the modules
    # it fuses, so only a per-expert adapter of one rank and alpha loads right in transformers 5.)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    _close(_logits(_peft(m["hf"], fused), ids), _logits(_peft(m["hf"], d / "per_expert"), ids))
    _close(_logits(_peft(m["hf"], f_back), ids), _logits(_peft(m["hf"], d / "fused"), ids))


def test_refusals(moe, tmp_path, capsys):
    m = moe["qwen3_moe"]
    d, facts = m["dir"], m["facts"]
    ours = convert(d / "fused", tmp_path / "ours", "megatron", facts=facts, progress=False)
    # What PEFT refuses on target_parameters: a dropout (DoRA LoraConfig refuses anyway).
    cfg = json.loads((ours / "adapter_config.json").read_text())
    cfg["lora_config"]["lora_dropout"] = 0.1
    (ours / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lora_dropout=0.1 with target_parameters"):
        convert(ours, tmp_path / "x", "peft", progress=False)
    convert(ours, tmp_path / "dropout_per_expert", "peft", moe_layout="per-expert", expert_names=m["names"], progress=False)

    def edited(name: str, config=None, tensors=None) -> Path:
        out = tmp_path / name
        out.mkdir()
        c = json.loads((d / "fused" / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**c, **(config or {})}))
        t = load_file(str(d / "fused" / "adapter_model.safetensors"))
        save_file({k: v.contiguous() for k, v in (tensors(t) if tensors else t).items()}, str(out / "adapter_model.safetensors"))
        return out

    cases = [
        (edited("dropout", dict(lora_dropout=0.05)), "lora_dropout=0.05 with target_parameters"),
        (edited("dora", dict(use_dora=True)), "use_dora"),
        # One targeted parameter but two nested LoRAs on the experts: keys follow target_parameters.
        (edited("nesting", dict(target_parameters=["mlp.experts.down_proj", "mlp.gate.weight"])), "nested LoRA"),
        # The router adapted but not targeted.
        (edited("untargeted", dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
         "does not adapt"),
        # Made for 2 experts of rank 4 (or 4 experts of rank 2): not this base's.
        (edited("experts", tensors=lambda t: {k: (v[: v.shape[0] // 2] if "experts.base_layer.lora_A" in k else
                                                 v[:, : v.shape[1] // 2] if "experts.base_layer.lora_B" in k else v)
                                              for k, v in t.items()}), "another base"),
    ]
    for src, message in cases:
        with pytest.raises(ValueError, match=message):
            convert(src, tmp_path / "y", "megatron", facts=facts, progress=False)
    # The fused layout adapts all experts of a layer.
    t = load_file(str(ours / "tp_rank_00.safetensors"))
    partial = tmp_path / "partial"
    partial.mkdir()
    cfg["lora_config"]["lora_dropout"] = 0.0
    expert3 = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2"
    del cfg["modules"][expert3]
    (partial / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in t.items() if not k.startswith(expert3)}, str(partial / "tp_rank_00.safetensors"))
    with pytest.raises(ValueError, match=r"experts \[3\] are not adapted"):
        convert(partial, tmp_path / "z", "peft", progress=False)
    assert cli_main(["convert", str(ours), str(tmp_path / "w"), "--to", "peft", "--moe-layout", "per-expert"]) == 1
    assert "--moe-layout per-expert needs --base" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_inspect_shows_experts(moe, tmp_path, capsys):
    d = moe["mixtral"]["dir"]
    convert(d / "per_expert", tmp_path / "ours", "megatron", facts=moe["mixtral"]["facts"], tp=2, progress=False)
    for src in (d / "fused", tmp_path / "ours"):
        assert cli_main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "experts:      fused layout (PEFT)" in out and "target params:" in out and "'mlp.experts.gate_up_proj'" in out
    assert "linear_fc1   layer 0 experts 0-3; layer 1 experts 0-3  r [4]  lora_alpha [6]" in out
    assert "linear_fc2   layer 0 experts 0-3; layer 1 experts 0-3  r [2]  lora_alpha [8]" in out
    assert "gate_proj    layer 0 experts 0-3; layer 1 experts 0-3  r [4]  lora_alpha [8]" in out
    assert "router       layer 0; layer 1  r [4]  lora_alpha [8]" in out
    assert "2 replicated" in out


def _generate(base: Path, adapter: Path, prompt: list[int], out: Path, *flags: str) -> tuple[torch.Tensor, list[int]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve().parents[1] / "scripts" / "generate.py"), "--base", str(base), "--adapter", str(adapter),
           "--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", "5",
           "--logits-out", str(out / "logits.safetensors"), "--tokens-out", str(out / "tokens.json"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "logits.safetensors"))["logits"], json.loads((out / "tokens.json").read_text())


#: The adapters the multi-rank tests load: (model, PEFT layout), and the layouts (TP, EP) they run at.
JOBS = {"mixtral_fused": ("mixtral", "fused"), "qwen3_moe_per_expert": ("qwen3_moe", "per_expert")}
RANK_LAYOUTS = ((1, 2), (2, 1))  # experts over expert parallelism, or over expert TP = 2


def _reference(m: dict, layout: str, tmp_path: Path) -> tuple[list[int], torch.Tensor, list[int]]:
    """(prompt, HF + PEFT logits, HF + PEFT greedy tokens) of a PEFT MoE adapter."""
    peft = _peft(m["hf"], m["dir"] / layout)
    # Routing without near-ties on the adapted model (PEFT's wrapped router hides its delta from hooks).
    ours = convert(m["dir"] / layout, tmp_path / f"ref_{layout}", "megatron", facts=m["facts"], progress=False)
    prompt = _prompt({"merged": _merged(m["hf"], ours, _fused_scaling if layout == "fused" else lambda *_: 8 / R)})
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = peft(ids).logits[0]
        tokens = peft.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
    return prompt, logits, tokens


def _ranks_body(rank, world, jobs, root):
    from megatron_lora import init_distributed
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.adapters import load_adapter, save_adapter
    from megatron_lora.runtime.generation import forward_logits, generate

    out = {}
    for tp, ep in RANK_LAYOUTS:
        init_distributed(tp, expert_model_parallel_size=ep)
        for name, (base, adapter, prompt) in jobs.items():
            model, _ = load_hf_base(base)
            config = load_adapter(model, adapter)
            out[(name, tp, ep)] = (forward_logits(model, torch.tensor([prompt]))[0], generate(model, prompt, 5))
            save_adapter(model, f"{root}/{name}_tp{tp}_ep{ep}", config)
            del model
    return out


def test_expert_parallel_load_generate_save(moe, tmp_path):
    """PEFT adapters of either layout on models at EP=2 and at expert TP=2: logits and greedy
    tokens equal HF + PEFT's, and the adapter saved from the model exports to the PEFT file again,
    bit for bit."""
    refs = {name: _reference(moe[m], layout, tmp_path) for name, (m, layout) in JOBS.items()}
    jobs = {name: (str(moe[m]["dir"] / "base"), str(moe[m]["dir"] / layout), refs[name][0]) for name, (m, layout) in JOBS.items()}
    ranks = run_ranks(_ranks_body, 2, jobs, str(tmp_path))
    for name, (model_type, layout) in JOBS.items():
        _, logits, tokens = refs[name]
        for tp, ep in RANK_LAYOUTS:
            for per_rank in ranks:
                got_logits, got_tokens = per_rank[(name, tp, ep)]
                _close(got_logits, logits)
                assert got_tokens == tokens, (name, tp, ep)
            saved = tmp_path / f"{name}_tp{tp}_ep{ep}"
            assert json.loads((saved / "adapter_config.json").read_text())["tp_size"] == tp
            back = convert(saved, tmp_path / f"{saved.name}_back", "peft", moe_layout=layout.replace("_", "-"),
                           expert_names=moe[model_type]["names"], progress=False)
            _same_files(moe[model_type]["dir"] / layout, back)


def test_generate_script_matches_hf_peft(moe, tmp_path):
    """generate.py under torchrun with a fused PEFT adapter, experts over 2 ranks, equals HF + PEFT."""
    m = moe["mixtral"]
    prompt, ref, tokens = _reference(m, "fused", tmp_path)
    logits, new = _generate(m["dir"] / "base", m["dir"] / "fused", prompt, tmp_path, "--expert-model-parallel-size", "2")
    _close(logits, ref)
    assert new == tokens
