"""PEFT's two mixture-of-experts adapter layouts on export: transformers 4's per-expert modules
(``{block}.experts.{e}.{proj}``, ``{block}.gate``) and transformers 5's fused experts through
``target_parameters`` (one LoRA per ``mlp.experts.gate_up_proj`` / ``down_proj`` over all experts,
``mlp.gate.weight``). :func:`megatron_lora.formats.peft.peft_plan` picks one."""

from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_lora.config import LoraConfig
from megatron_lora.formats.checkpoint import ShardReader, module_key, segment_name, split_key
from megatron_lora.formats.plans import TensorPlan, bind
from megatron_lora.hf.layout import (
    EXPERT_MODULES,
    EXPERT_PROJECTIONS,
    FUSED_EXPERTS,
    PEFT_PREFIX,
    ROUTER,
    MoeModule,
    MoeNames,
    fuse_experts,
    moe_hf_name,
    split_block_diagonal,
    stack_lora,
)


def peft_module_key(module: str, factor: str) -> str:
    """PEFT's key of a linear LoRA factor of module ``module`` (HF name)."""
    return f"{PEFT_PREFIX}{module}.{factor}.weight"


def _rescaled_alpha(config: LoraConfig, alpha: float, r: int, new_r: int) -> float:
    """The alpha giving rank ``new_r`` the scaling ``alpha`` gives rank ``r``."""
    return alpha * (math.sqrt(new_r / r) if config.use_rslora else new_r / r)


def _b_key(a_key: str) -> str:
    module, _, seg = split_key(a_key)
    return module_key(module, "lora_B", seg)


def _per_expert_plans(reader: ShardReader, config: LoraConfig, experts: dict[MoeModule, dict[str, str]], modules: dict,
                      names: MoeNames) -> list[TensorPlan]:
    """transformers 4's modules: one PEFT module per expert projection and the router.

    A shared-A ``linear_fc1`` whose B is block-diagonal (two LoRAs stacked, as the fused
    layout holds a per-projection pair) splits back into them; any other is duplicated A and
    split B, which computes the same.
    """
    plans = []
    dtype = reader.dtype
    for module, segs in sorted(experts.items(), key=lambda kv: (kv[0].layer, kv[0].expert or -1, kv[0].module)):
        for seg, a_key in segs.items():
            r, alpha = reader.full_shape(a_key)[0], config.rank_alpha(segment_name(config, a_key))[1]
            if seg != "linear_fc1":
                name = moe_hf_name(module, {"linear_fc2": "down_proj"}.get(seg, seg), names)
                modules[name] = (r, alpha)
                for k in (a_key, _b_key(a_key)):
                    plans.append(TensorPlan(peft_module_key(name, split_key(k)[1]), tuple(reader.full_shape(k)),
                                            dtype(k), bind(reader.full, k)))
                continue
            a, b = reader.full(a_key), reader.full(_b_key(a_key))
            pair = split_block_diagonal(a, b, 2) or [(a, h) for h in b.chunk(2, 0)]
            for proj, (pa, pb) in zip(EXPERT_PROJECTIONS[seg], pair):
                name = moe_hf_name(module, proj, names)
                modules[name] = (pa.shape[0], _rescaled_alpha(config, alpha, r, pa.shape[0]))
                plans += [TensorPlan(peft_module_key(name, f), tuple(t.shape), dtype(a_key), bind(t.contiguous))
                          for f, t in (("lora_A", pa), ("lora_B", pb))]
    return plans


def _fused_plans(reader: ShardReader, config: LoraConfig, experts: dict[MoeModule, dict[str, str]],
                 params: dict) -> list[TensorPlan]:
    """transformers 5's fused experts: per layer, one LoRA over ``gate_up_proj`` and one over
    ``down_proj`` of all experts (:func:`layout.fuse_experts`), the router on ``gate.weight``.

    Every expert of the layer must be adapted, at one rank and scaling. A per-projection
    gate / up pair becomes one LoRA over [gate; up] (A stacked, B block-diagonal, rank summed,
    alpha rescaled to keep the scaling), as PEFT converts transformers 4 adapters.
    """
    facts = reader.facts
    n = facts.moe.num_experts
    plans = []
    for layer in sorted({m.layer for m in experts}):
        targeted = [m for m in EXPERT_MODULES if any(MoeModule(layer, e, m) in experts for e in range(n))]
        for depth, kind in zip(range(len(targeted) - 1, -1, -1), targeted):
            where = f"{reader.directory}: layer {layer} {kind}"
            missing = [e for e in range(n) if MoeModule(layer, e, kind) not in experts]
            if missing:
                raise ValueError(f"{where}: experts {missing} are not adapted; transformers 5's fused layout adapts "
                                 "all experts of a layer (use the per-expert layout)")
            per_expert = [_fusable(reader, config, experts[MoeModule(layer, e, kind)], kind, f"{where} expert {e}")
                          for e in range(n)]
            if len({(r, alpha) for _, r, alpha in per_expert}) != 1:
                raise ValueError(f"{where}: the experts' (rank, alpha) differ ({sorted({(r, a) for _, r, a in per_expert})}): "
                                 "the fused layout has one per layer (use the per-expert layout)")
            r, alpha = per_expert[0][1:]
            params[MoeModule(layer, 0, kind).parameter] = (r, alpha)
            fan_in, fan_out = facts.moe.segment_shape(kind, facts.hidden_size)
            read = bind(_fused_factors, [f for f, _, _ in per_expert])
            base = f"{PEFT_PREFIX}model.layers.{layer}.{FUSED_EXPERTS}{'.base_layer' * depth}"
            dtype = reader.dtype(next(iter(experts[MoeModule(layer, 0, kind)].values())))
            plans.append(TensorPlan(f"{base}.lora_A.weight", (n * r, fan_in), dtype, lambda read=read: read()[0]))
            plans.append(TensorPlan(f"{base}.lora_B.weight", (fan_out, n * r), dtype, lambda read=read: read()[1]))
        router = MoeModule(layer, None, ROUTER)
        if router in experts:
            a_key = experts[router][ROUTER]
            params[router.parameter] = (reader.full_shape(a_key)[0], config.rank_alpha(segment_name(config, a_key))[1])
            plans += [TensorPlan(peft_module_key(router.parameter.removesuffix(".weight"), split_key(k)[1]),
                                 tuple(reader.full_shape(k)), reader.dtype(k), bind(reader.full, k))
                      for k in (a_key, _b_key(a_key))]
    return plans


def _fusable(reader: ShardReader, config: LoraConfig, segs: dict[str, str], module: str,
             where: str) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], int, float]:
    """(read (A, B), rank, alpha) of one LoRA over an expert's whole ``module``: a gate / up
    pair with one A is the shared-A LoRA it was exported from, any other pair is stacked
    (:func:`layout.stack_lora`)."""
    if len(segs) == 1 and set(segs) <= {module, *EXPERT_PROJECTIONS["linear_fc2"]}:
        a_key = next(iter(segs.values()))
        r, alpha = reader.full_shape(a_key)[0], config.rank_alpha(segment_name(config, a_key))[1]
        return bind(lambda k: (reader.full(k), reader.full(_b_key(k))), a_key), r, alpha
    if set(segs) != set(EXPERT_PROJECTIONS["linear_fc1"]):
        raise ValueError(f"{where}: segments {sorted(segs)}: the fused gate_up_proj needs one LoRA over both "
                         "projections or both gate_proj and up_proj (use the per-expert layout)")
    keys = [segs[p] for p in EXPERT_PROJECTIONS["linear_fc1"]]
    if len({config.scaling(segment_name(config, k)) for k in keys}) != 1:
        raise ValueError(f"{where}: gate_proj and up_proj have different scalings; the fused gate_up_proj has one")
    ranks = [reader.full_shape(k)[0] for k in keys]
    alpha = config.rank_alpha(segment_name(config, keys[0]))[1]
    if ranks[0] == ranks[1] and torch.equal(reader.full(keys[0]), reader.full(keys[1])):
        # One A for both (how a shared-A LoRA exports per projection): that shared-A LoRA again.
        return bind(lambda: (reader.full(keys[0]), torch.cat([reader.full(_b_key(k)) for k in keys]))), ranks[0], alpha
    alpha = _rescaled_alpha(config, alpha, ranks[0], sum(ranks))
    return bind(lambda: stack_lora([(reader.full(k), reader.full(_b_key(k))) for k in keys])), sum(ranks), alpha


def _fused_factors(per_expert: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
    return fuse_experts([read() for read in per_expert])
