"""Whole-model LoRA at TP=1 and TP=2 on real megatron-core (gloo, CPU) against HF + PEFT.

One spawned group per TP size runs every check; the TP=2 group saves checkpoints that the
TP=1 group reloads. Tolerance: max |diff| <= 1e-5 x max |logit| (fp32), gradients likewise
relative to their own scale.
"""

from __future__ import annotations

import os

import pytest
import torch

from dist import run_ranks
from oracle import TOL

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _build(world: int, seed: int = 7):
    from megatron_lora.model.gpt import build_gpt, gpt_config

    torch.manual_seed(seed)
    cfg = gpt_config(2, 64, 8, 96, num_query_groups=2, tensor_model_parallel_size=world)
    return build_gpt(cfg, 128, max_sequence_length=64)


def _logits(model, ids):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora.model.gpt import positions_for

    return gather_from_tensor_model_parallel_region(model(ids, positions_for(ids), None))


IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8, 0, 31, 77, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def _oracle_checks(world: int) -> dict:
    """Per-projection LoRA on all seven projections vs HF Llama + PEFT: logits and grads."""
    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.model.adapters import model_facts
    from oracle import hf_llama, lora_grads, peft_lora_tensors, peft_model

    from megatron_lora import trainable_parameters

    model = apply_lora(_build(world), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    counts = trainable_parameters(model)
    logits = _logits(model, IDS)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * weight).sum().backward()
    facts = model_facts(model)
    pm = peft_model(hf_llama(model, facts), peft_lora_tensors(model), 4, 8, SEVEN)
    ref = pm(IDS).logits
    (ref * weight).sum().backward()
    modules = dict(pm.base_model.model.named_modules())
    grad_err = 0.0
    ours = lora_grads(model)
    assert len(ours) == 7 * 2
    for name, (ga, gb) in ours.items():
        m = modules[name]
        grad_err = max(grad_err, _rel(ga, m.lora_A["default"].weight.grad), _rel(gb, m.lora_B["default"].weight.grad))
    peft_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return {"logit_err": _rel(logits.detach(), ref.detach()), "grad_err": grad_err,
            "trainable": counts["trainable"], "peft_trainable": peft_trainable}


def _checks(rank: int, world: int, tmp: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_lora import (
        LoraConfig,
        apply_lora,
        enable_adapters,
        init_distributed,
        lora_layer_spec,
        load_adapter,
        merge_lora,
        save_adapter,
        set_adapters,
        unmerge_lora,
    )
    from megatron_lora.model.gpt import build_gpt, gpt_config
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_lora.parallel.attention import with_sdpa_attention
    from megatron_lora.parallel.lora_layers import lora_layers

    init_distributed(world, seed=11)
    out = {"oracle": _oracle_checks(world)}

    # Default init (B = 0) leaves the model unchanged; full A equals TP=1's (slices of one init).
    base = _build(world)
    base_logits = _logits(base, IDS).detach()
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=FUSED)
    model = apply_lora(base, cfg)
    out["default_init_err"] = (_logits(model, IDS).detach() - base_logits).abs().max().item()
    from oracle import gather_rows

    row = model.decoder.layers[0].self_attention.linear_proj
    out["row_A_full"] = gather_rows(row.lora_A["default"]["linear_proj"].detach(), 1)

    # Non-zero B for the rest; shared-A on every module including gated fc1.
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in layer.lora_B["default"].values():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
            for p in layer.lora_B["default"].values():
                if getattr(p, "tensor_model_parallel", False):
                    full = torch.empty(p.shape[0] * world, p.shape[1]).normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
                    from megatron_lora.parallel.lora_layers import shard_rows

                    blocks = layer.lora_specs["default"].segments[0].blocks
                    p.copy_(shard_rows(full, blocks, rank, world))
    logits = _logits(model, IDS).detach()
    out["shared_logits"] = logits
    out["lora_effect"] = (logits - base_logits).abs().max().item()

    # Merge / unmerge.
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    merge_lora(model)
    out["merged_err"] = _rel(_logits(model, IDS).detach(), logits)
    unmerge_lora(model)
    out["unmerge_exact"] = all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)

    # Disable -> base; a second adapter adds its own delta.
    enable_adapters(model, False)
    out["disabled_err"] = (_logits(model, IDS).detach() - base_logits).abs().max().item()
    enable_adapters(model, True)
    apply_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "second")
    set_adapters(model, ["second"])
    second = _logits(model, IDS).detach()
    set_adapters(model, ["default", "second"])
    both = _logits(model, IDS).detach()
    merge_lora(model)  # both active adapters into W: the same function of the input
    out["two_adapters_err"] = _rel(_logits(model, IDS).detach(), both)
    out["two_adapters_differ"] = min((both - second).abs().max().item(), (both - logits).abs().max().item())
    unmerge_lora(model)
    set_adapters(model, ["default"])
    out["back_to_one_err"] = (_logits(model, IDS).detach() - logits).abs().max().item()

    # The layer-spec path (on build_gpt's default attention) gives the same outputs for the same weights.
    spec = lora_layer_spec(with_sdpa_attention(get_gpt_layer_local_spec(normalization="RMSNorm")), cfg)
    torch.manual_seed(0)
    spec_model = build_gpt(gpt_config(2, 64, 8, 96, num_query_groups=2, tensor_model_parallel_size=world), 128, max_sequence_length=64, layer_spec=spec)
    own = {k: v for k, v in model.state_dict().items() if ".second" not in k}
    spec_model.load_state_dict(own, strict=True)
    out["spec_err"] = _rel(_logits(spec_model, IDS).detach(), logits)

    # One optimizer step: replicated factors stay identical across TP ranks.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (_logits(model, IDS) ** 2).mean().backward()
    opt.step()
    qkv = model.decoder.layers[1].self_attention.linear_qkv
    fc2 = model.decoder.layers[1].mlp.linear_fc2
    out["replicated_after_step"] = [qkv.lora_A["default"]["linear_qkv"].detach().clone(), fc2.lora_B["default"]["linear_fc2"].detach().clone()]
    out["trained_logits"] = _logits(model, IDS).detach()

    if world == 2:
        save_adapter(model, f"{tmp}/adapter", cfg)
        if rank == 0:
            os.makedirs(f"{tmp}/dist")
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), f"{tmp}/dist")
        torch.distributed.barrier()
    else:
        fresh = _build(world)
        out["reloaded_targets"] = load_adapter(fresh, f"{tmp}/adapter").target_modules
        out["safetensors_reload_logits"] = _logits(fresh, IDS).detach()
        target = apply_lora(_build(world), cfg)
        state = dist_checkpointing.load(target.sharded_state_dict(), f"{tmp}/dist")
        target.load_state_dict(state)
        out["dist_reload_logits"] = _logits(target, IDS).detach()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tp"))
    tp2 = run_ranks(_checks, 2, tmp)
    tp1 = run_ranks(_checks, 1, tmp)
    return {"tp1": tp1, "tp2": tp2}


@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_matches_hf_peft_logits_and_grads(results, tp):
    for r in results[tp]:
        assert r["oracle"]["logit_err"] <= TOL, r["oracle"]
        assert r["oracle"]["grad_err"] <= 1e-4, r["oracle"]
        assert r["oracle"]["trainable"] == r["oracle"]["peft_trainable"] == 2 * 4 * (128 + 80 + 80 + 128 + 160 + 160 + 160)


def test_default_init_is_a_no_op_and_tp_slices_one_init(results):
    for tp in ("tp1", "tp2"):
        for r in results[tp]:
            assert r["default_init_err"] == 0.0
    assert torch.equal(results["tp2"][0]["row_A_full"], results["tp1"][0]["row_A_full"])


def test_shared_a_tp2_equals_tp1(results):
    ref = results["tp1"][0]["shared_logits"]
    assert results["tp1"][0]["lora_effect"] > 1e-3  # the adapters do change the output
    for r in results["tp2"]:
        assert _rel(r["shared_logits"], ref) <= TOL


@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_merge_unmerge_disable_adapters_spec(results, tp):
    for r in results[tp]:
        assert r["merged_err"] <= TOL
        assert r["unmerge_exact"]
        assert r["disabled_err"] == 0.0
        assert r["two_adapters_err"] <= TOL and r["two_adapters_differ"] > 1e-4
        assert r["back_to_one_err"] == 0.0
        assert r["spec_err"] == 0.0


def test_replicated_factors_identical_after_optimizer_step(results):
    a0, a1 = results["tp2"][0]["replicated_after_step"], results["tp2"][1]["replicated_after_step"]
    for x, y in zip(a0, a1):
        assert torch.equal(x, y)
    # and the step matches TP=1's step on the same factors
    for x, y in zip(a0, results["tp1"][0]["replicated_after_step"]):
        assert _rel(x, y) <= 1e-4


def test_tp2_checkpoints_reload_at_tp1(results):
    trained = results["tp2"][0]["trained_logits"]
    tp1 = results["tp1"][0]
    assert tp1["reloaded_targets"] == FUSED
    assert _rel(tp1["safetensors_reload_logits"], trained) <= TOL
    assert _rel(tp1["dist_reload_logits"], trained) <= TOL
