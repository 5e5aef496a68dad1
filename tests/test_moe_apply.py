"""apply_lora and adapter checkpoints on MoE models (Qwen3-MoE, Mixtral) at TP x EP x expert TP,
against HF + PEFT on one device.

Qwen3-MoE carries a PEFT 0.21.2 adapter made on the transformers-5 model with
``target_parameters`` (experts fused in memory; expert e owns A's rows e*r..e*r+r-1 and B's
columns e::E) plus q_proj / v_proj and the router's ``gate.weight``, written here as our TP=1
checkpoint by that rule and loaded at every layout: logits and every factor's gradient must
equal HF + PEFT's. Mixtral gets ``apply_lora`` by its HF aliases (w1 / w3 / w2, router
``gate``; per-projection segments) with a seed: every layout must start from the same adapter
and give the single-rank logits and gradients. One spawned group of 4 gloo ranks runs
(TP, EP, expert TP) = (1,1,1), (2,1,2), (1,2,1), (2,2,1); each layout saves its Mixtral adapter
and the next loads it (the last one's at (1,1,1) again); the files must not depend on the
layout that saved them beyond their TP size, and ``reshard`` must move between those.

Gradients are reduced as megatron-core's DDP does: dense factors averaged over data parallel,
expert factors summed over the expert data-parallel group over data parallel x TP (see
``tests/test_moe_lora.py``). Tolerance: 1e-5 x the largest reference value, fp32.
"""

import copy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist import run_ranks
from test_moe_import import COMMON, MIN_GAP, _perturbed
from test_moe_lora import _calls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

R, ALPHA, E, FFN = 4, 8, 4, 32
TOL = 1e-5
#: (TP, EP, expert TP) on 4 ranks; the first is the single-rank reference.
LAYOUTS = ((1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 1))
PEFT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "gate.weight"]
MIXTRAL_TARGETS = ["o_proj", "w1", "w3", "w2", "gate"]


def _router_gap(model, ids: torch.Tensor, topk: int) -> float:
    """Smallest gap between the k-th and (k+1)-th router probability, from the routers'
    own logits (LoRA included)."""
    gaps = []

    def hook(module, args, out):
        top = torch.softmax(out[0].float(), -1).topk(topk + 1, -1).values
        gaps.append((top[:, topk - 1] - top[:, topk]).min().item())

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    assert len(gaps) == len(handles) > 0
    return min(gaps)


def _peft_factors(peft_model) -> dict:
    """{(HF module or parameter name, "A"|"B"): tensor} of a PEFT model's LoRA (``.weight`` on
    the factors, or their gradients)."""
    from peft.tuners.lora.layer import Linear, ParamWrapper

    out = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, (Linear, ParamWrapper)):
            name = name.replace(".base_layer", "").removeprefix("base_model.model.")
            if isinstance(m, ParamWrapper):
                name = f"{name}.{m.parameter_name}"
            out[(name, "A")], out[(name, "B")] = m.lora_A["default"].weight, m.lora_B["default"].weight
    return out


def _to_ours(peft: dict, layers: int) -> dict:
    """PEFT factors (or gradients) -> our TP=1 checkpoint keys."""
    out = {}
    for layer in range(layers):
        hf, mg = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for proj in ("q_proj", "v_proj"):
            for f in "AB":
                out[f"{mg}self_attention.linear_qkv.lora_{f}.{proj}"] = peft[(f"{hf}self_attn.{proj}", f)]
        for f in "AB":
            out[f"{mg}mlp.router.lora_{f}.router"] = peft[(f"{hf}mlp.gate.weight", f)]
        for module, param in (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj")):
            a, b = peft[(f"{hf}mlp.experts.{param}", "A")], peft[(f"{hf}mlp.experts.{param}", "B")]
            for e in range(E):
                key = f"{mg}mlp.experts.local_experts.{e}.{module}"
                out[f"{key}.lora_A.{module}"] = a[e * R:(e + 1) * R]
                out[f"{key}.lora_B.{module}"] = b[:, e::E]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def moe_setup(tmp_path_factory):
    from peft import LoraConfig as PeftConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_lora.config import LoraConfig
    from megatron_lora.formats.checkpoint import checkpoint_config, write_checkpoint
    from megatron_lora.hf.importer import hf_model_facts, read_hf_config

    root = tmp_path_factory.mktemp("moe_apply")
    torch.manual_seed(0)
    qwen = _perturbed(Qwen3MoeForCausalLM(Qwen3MoeConfig(
        num_experts=E, moe_intermediate_size=FFN, intermediate_size=80, norm_topk_prob=True, **COMMON)))
    mixtral = _perturbed(MixtralForCausalLM(MixtralConfig(num_local_experts=E, intermediate_size=FFN, **COMMON)))
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(qwen), PeftConfig(
        r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], target_parameters=PEFT_PARAMETERS,
        init_lora_weights=False)).eval()
    for seed in range(200):
        ids = torch.randint(0, COMMON["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(seed))
        if _router_gap(peft_model, ids, 2) > MIN_GAP and _router_gap(mixtral, ids, 2) > MIN_GAP:
            break
    else:
        raise AssertionError("no prompt without near-tied router scores")
    weights = torch.randn(1, ids.shape[1], COMMON["vocab_size"], generator=torch.Generator().manual_seed(5))
    logits = peft_model(ids).logits
    (logits * weights).sum().backward()
    factors = _peft_factors(peft_model)
    grads = _to_ours({k: v.grad for k, v in factors.items()}, COMMON["num_hidden_layers"])
    state = _to_ours(factors, COMMON["num_hidden_layers"])
    dirs = {"qwen": root / "qwen", "mixtral": root / "mixtral"}
    qwen.save_pretrained(dirs["qwen"])
    mixtral.save_pretrained(dirs["mixtral"])
    # PEFT's adapter as our TP=1 checkpoint.
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], target_parameters=PEFT_PARAMETERS)
    table = {}
    for key in state:
        module, factor, seg = key.rsplit(".", 2)
        style = "replicated" if module.endswith("router") else "row" if module.endswith("fc2") else "column"
        table.setdefault(module, {"parallel": style, "segments": {}})["segments"][seg] = {"blocks": 2 if seg == "linear_fc1" else 1}
    facts = hf_model_facts(read_hf_config(dirs["qwen"]))
    write_checkpoint(root / "qwen_adapter", checkpoint_config("lora", 1, facts, config.to_dict(), modules=table), [state])
    # The same without expert 3 (a model with all experts must refuse it, not adapt three).
    table = {k: v for k, v in table.items() if ".local_experts.3." not in k}
    state = {k: v for k, v in state.items() if ".local_experts.3." not in k}
    write_checkpoint(root / "qwen_adapter_3", checkpoint_config("lora", 1, facts, config.to_dict(), modules=table), [state])
    return {k: str(v) for k, v in dirs.items()}, str(root / "qwen_adapter"), ids[0].tolist(), weights, \
        logits.detach()[0], grads, root


def _full_grads(model, tp: int) -> dict:
    """Every LoRA factor's gradient under its checkpoint key, reduced as megatron-core's DDP
    reduces it and gathered to the full (TP=1) tensor."""
    from megatron.core import parallel_state as ps

    from megatron_lora.formats.checkpoint import module_key
    from megatron_lora.hf.layout import factor_dim
    from megatron_lora.model.lora import iter_linear_sites
    from megatron_lora.parallel.lora_layers import LoraLayer, unshard_rows

    dp = ps.get_data_parallel_world_size()
    out = {}
    for site in iter_linear_sites(model):
        lora = site.module
        if not isinstance(lora, LoraLayer):
            continue
        expert = site.moe is not None and site.moe.expert is not None
        for factor in ("lora_A", "lora_B"):
            for seg in lora.lora_specs["default"].segments:
                g = getattr(lora, factor)["default"][seg.name].grad.clone()
                if expert:  # summed over expert data parallel, each token seen TP times (no SP)
                    torch.distributed.all_reduce(g, group=ps.get_expert_data_parallel_group())
                    g /= dp * tp
                else:
                    torch.distributed.all_reduce(g, group=ps.get_data_parallel_group())
                    g /= dp
                dim = factor_dim(lora.parallel_mode, factor)
                if dim is not None:
                    parts = [torch.empty_like(g) for _ in range(lora.tp_group.size())]
                    torch.distributed.all_gather(parts, g, group=lora.tp_group)
                    g = unshard_rows(parts, seg.blocks) if dim == 0 else torch.cat(parts, 1)
                out[module_key(site.global_name, factor, seg.name)] = g
    return out


def _body(rank, world, dirs, qwen_adapter, prompt, weights, root):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora import init_distributed
    from megatron_lora.config import LoraConfig
    from megatron_lora.model.gpt import positions_for
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.adapters import load_adapter, save_adapter
    from megatron_lora.model.lora import apply_lora, enable_adapters, merge_lora
    from megatron_lora.runtime.generation import forward_logits

    ids = torch.tensor([prompt])
    mixtral_config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=MIXTRAL_TARGETS, init_lora_weights=False)
    out = {}
    for i, (tp, ep, etp) in enumerate(LAYOUTS):
        init_distributed(tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        for name in ("qwen", "mixtral"):
            model, _ = load_hf_base(dirs[name])
            if name == "qwen":
                load_adapter(model, qwen_adapter)
            else:
                apply_lora(model, mixtral_config, seed=7)
            # A trainable embedding makes the pass without LoRA run the whole backward too,
            # so the two passes' collectives compare.
            model.embedding.word_embeddings.weight.requires_grad_(True)
            logits = []

            def step():
                local = model(ids, positions_for(ids), None)
                logits.append(gather_from_tensor_model_parallel_region(local)[0, :, :COMMON["vocab_size"]])
                (logits[-1] * weights).sum().backward()

            enable_adapters(model, False)
            base_comm = Counter(_calls(step))
            enable_adapters(model, True)
            model.zero_grad(set_to_none=True)
            lora_comm = Counter(_calls(step))
            sizes = {p.numel() for p in model.parameters() if p.requires_grad}
            r = out[(name, tp, ep, etp)] = {
                "logits": logits[-1].detach(), "base_logits": logits[0].detach(), "grads": _full_grads(model, tp),
                "extra": lora_comm - base_comm, "missing": base_comm - lora_comm, "factor_sizes": sizes,
                "marks": _marks_follow_weights(model)}
            merge_lora(model)
            r["merged_logits"] = forward_logits(model, ids)[0]
            if name == "mixtral":
                save_adapter(model, root / f"mixtral_{i}", mixtral_config)
                if i > 0:  # the previous layout's adapter, loaded here
                    loaded, _ = load_hf_base(dirs[name])
                    load_adapter(loaded, root / f"mixtral_{i - 1}")
                    r["loaded_logits"] = forward_logits(loaded, ids)[0]
            del model
    init_distributed(1)
    loaded, _ = load_hf_base(dirs["mixtral"])
    load_adapter(loaded, root / f"mixtral_{len(LAYOUTS) - 1}")
    out["last_loaded_logits"] = forward_logits(loaded, ids)[0]
    out.update(_targets_and_refusals(dirs["qwen"], qwen_adapter))
    return out


def _marks_follow_weights(model) -> bool:
    """Every factor carries its weight's gradient-reduction marks: an expert's allreduce=False
    (expert data-parallel reduction), the router's sequence_parallel."""
    from megatron_lora.parallel.lora_layers import lora_layers

    ok = True
    for _, layer in lora_layers(model):
        marks = ("allreduce", "sequence_parallel") if layer.parallel_mode == "replicated" else ("allreduce",)
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
            for mark in marks:
                ok &= getattr(p, mark, None) == getattr(layer.weight, mark, None)
            ok &= layer.parallel_mode != "replicated" or not getattr(p, "tensor_model_parallel", False)
    return ok


def _targets_and_refusals(qwen_dir, qwen_adapter) -> dict:
    """What "all-linear" adapts on layer 0 of an MoE model, and the refusals (at TP=1)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_lora.config import LoraConfig
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.adapters import load_adapter
    from megatron_lora.model.gpt import build_gpt, gpt_config
    from megatron_lora.model.lora import apply_lora

    model, _ = load_hf_base(qwen_dir)
    errors = {}
    try:
        load_adapter(model, f"{qwen_adapter}_3")
    except ValueError as e:
        errors["missing_expert"] = str(e)
    refused = {
        "megatron_and_hf": LoraConfig(target_modules=["linear_fc1", "gate_proj"]),
        "module_and_parameter": LoraConfig(target_modules=["linear_fc2"], target_parameters=["down_proj"]),
    }
    cfg = gpt_config(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=32, num_moe_experts=4,
                     moe_router_topk=2, moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16,
                     moe_token_dispatcher_type="allgather")
    # build_gpt refuses shared experts itself; a model built with them elsewhere is refused here.
    shared = build_gpt(cfg, vocab_size=64, layer_spec=get_gpt_decoder_block_spec(cfg, use_transformer_engine=False))
    for key, config in refused.items():
        try:
            apply_lora(model, config)
        except ValueError as e:
            errors[key] = str(e)
    for targets in (["linear_fc1"], ["down_proj"]):
        try:
            apply_lora(shared, LoraConfig(target_modules=targets))
        except ValueError as e:
            errors[f"shared_{targets[0]}"] = str(e)
    apply_lora(model, LoraConfig(target_modules="all-linear"))
    adapted = {(n.split(".lora_A.")[0].removeprefix("decoder.layers.0."), n.rsplit(".", 1)[1])
               for n, _ in model.named_parameters() if ".lora_A." in n and n.startswith("decoder.layers.0.")}
    return {"errors": errors, "all_linear": adapted}


def test_moe_lora_layouts_checkpoints_and_peft(moe_setup, tmp_path):
    from megatron_lora.formats.convert import convert

    dirs, qwen_adapter, prompt, weights, peft_logits, peft_grads, root = moe_setup
    ranks = run_ranks(_body, 4, dirs, qwen_adapter, prompt, weights, root)
    ref = {"qwen": {"logits": peft_logits, "grads": peft_grads},
           "mixtral": ranks[0][("mixtral", *LAYOUTS[0])]}
    for name, want in ref.items():
        scale = want["logits"].abs().max().item()
        gscale = max(g.abs().max().item() for g in want["grads"].values())
        assert gscale > 0
        for layout in LAYOUTS:
            seen = set()
            for per_rank in ranks:
                r = per_rank[(name, *layout)]
                # LoRA moves the logits far beyond the tolerance, so an adapter left out fails.
                assert (r["base_logits"] - want["logits"]).abs().max().item() > 100 * TOL * scale
                diff = (r["logits"] - want["logits"]).abs().max().item()
                assert diff <= TOL * scale, (name, layout, diff, scale)
                for key, g in r["grads"].items():  # under expert parallelism: this rank's experts
                    seen.add(key)
                    assert g.shape == want["grads"][key].shape, (name, layout, key)
                    gdiff = (g - want["grads"][key]).abs().max().item()
                    assert gdiff <= TOL * gscale, (name, layout, key, gdiff, gscale)
                # No activation collective beyond the base model's and the dispatcher's: LoRA
                # adds only sums of replicated factors' gradients.
                assert not r["missing"], (name, layout, r["missing"])
                assert all(op == "all_reduce" and n in r["factor_sizes"] for op, n in r["extra"]), (name, layout, r["extra"])
                assert r["marks"], (name, layout)
                # Merged into the experts' and router's local weights: the same logits.
                assert (r["merged_logits"] - r["logits"]).abs().max().item() <= TOL * scale, (name, layout)
                if "loaded_logits" in r:
                    assert (r["loaded_logits"] - want["logits"]).abs().max().item() <= TOL * scale, (name, layout)
            assert seen == want["grads"].keys(), (name, layout, seen ^ want["grads"].keys())
    errors = ranks[0]["errors"]
    assert "names both" in errors["megatron_and_hf"]
    assert "none for decoder.layers.0.mlp.experts.local_experts.3.linear_fc1" in errors["missing_expert"]
    assert "both target_modules and target_parameters" in errors["module_and_parameter"]
    assert "shared experts" in errors["shared_linear_fc1"] and "shared experts" in errors["shared_down_proj"]
    # "all-linear": the HF projections (per-projection LoRA) and, as in PEFT, the router.
    experts = {(f"mlp.experts.local_experts.{e}.{m}", s) for e in range(E)
               for m, segs in (("linear_fc1", ("gate_proj", "up_proj")), ("linear_fc2", ("down_proj",))) for s in segs}
    attention = {("self_attention.linear_qkv", p) for p in ("q_proj", "k_proj", "v_proj")} | {("self_attention.linear_proj", "o_proj")}
    assert ranks[0]["all_linear"] == experts | attention | {("mlp.router", "router")}
    mixtral_scale = ref["mixtral"]["logits"].abs().max().item()
    assert (ranks[0]["last_loaded_logits"] - ref["mixtral"]["logits"]).abs().max().item() <= TOL * mixtral_scale
    # Every expert of every layer, with global indices, in every file.
    keys = set(load_file(root / "mixtral_0" / "tp_rank_00.safetensors"))
    assert {k for k in keys if ".experts." in k} == {
        f"decoder.layers.{L}.mlp.experts.local_experts.{e}.{m}.lora_{f}.{s}" for L in range(2) for e in range(E)
        for m, segs in (("linear_fc1", ("gate_proj", "up_proj")), ("linear_fc2", ("down_proj",))) for s in segs for f in "AB"}
    assert {k for k in keys if ".router." in k} == {f"decoder.layers.{L}.mlp.router.lora_{f}.router" for L in range(2) for f in "AB"}
    # The files depend on the TP size only; reshard moves between them.
    by_tp = {1: [0, 2], 2: [1, 3]}
    for tp, saved in by_tp.items():
        files = [[load_file(root / f"mixtral_{i}" / f"tp_rank_{j:02d}.safetensors") for j in range(tp)] for i in saved]
        other = 3 - tp
        convert(root / f"mixtral_{by_tp[other][0]}", tmp_path / f"to{tp}", "megatron", tp=tp, progress=False)
        files.append([load_file(tmp_path / f"to{tp}" / f"tp_rank_{j:02d}.safetensors") for j in range(tp)])
        for j in range(tp):
            for k, v in files[0][j].items():
                assert all(torch.equal(v, f[j][k]) for f in files[1:]), (tp, j, k)
