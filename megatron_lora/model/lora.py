"""apply_lora and friends: add LoRA adapters to megatron-core models by PEFT's rules."""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Optional

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from megatron_lora.config import LoraConfig
from megatron_lora.hf.layout import MODULE_PATH, ModelFacts, hf_module_name, megatron_module_name
from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, add_lora_support, lora_layers
from megatron_lora.parallel.device import device


def iter_linear_modules(model: nn.Module) -> Iterator[tuple[str, int, str, nn.Module]]:
    """(name, global layer index, Megatron module kind, module) of every targetable linear.

    The global index comes from the enclosing TransformerLayer's ``layer_number``, so
    pipeline stages (whose ``decoder.layers.{i}`` is stage-local) match PEFT's indices.
    """
    layer_of: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            layer_of[name] = module.layer_number - 1
        for kind, path in MODULE_PATH.items():
            if name == path or name.endswith("." + path):
                owner = name[: -len(path)].rstrip(".")
                if owner not in layer_of:
                    raise ValueError(f"cannot find the transformer layer that owns {name!r}")
                yield name, layer_of[owner], kind, module


def _model_facts(module: nn.Module) -> ModelFacts:
    return ModelFacts.from_transformer_config(module.config, vocab_size=0)


def adapter_spec_for(config: LoraConfig, facts: ModelFacts, layer: int, kind: str, tp: int) -> Optional[AdapterSpec]:
    """The segments ``config`` puts on Megatron module ``kind`` of global layer ``layer``."""
    shared_name = megatron_module_name(layer, kind)
    shared = config.matches(shared_name, layer)
    projections = [p for p in facts.projections(kind) if config.matches(hf_module_name(layer, p), layer)]
    if shared and projections:
        raise ValueError(
            f"target_modules={config.target_modules!r} names both {kind} and {projections} on "
            f"layer {layer}: use Megatron names (shared A) or HF names (per projection), not both"
        )
    if shared:
        named = [(kind, None, shared_name)]
    else:
        named = [(p, p, hf_module_name(layer, p)) for p in projections]
    if not named:
        return None
    segments = []
    for seg_name, proj, full_name in named:
        r, _ = config.rank_alpha(full_name)
        geometry = facts.segment_geometry(kind, proj, tp)
        segments.append(Segment(name=seg_name, r=r, scaling=config.scaling(full_name), **geometry))
    return AdapterSpec(tuple(segments), dropout=config.lora_dropout, init=config.init_lora_weights)


def add_adapters(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 dtype: torch.dtype = torch.float32, seed: Optional[int] = None) -> int:
    """Add adapter ``adapter_name`` to every matching parallel linear; return how many.

    Every module is checked before any is changed, so an error leaves the model as it was.
    The factors are drawn from the default RNG (as PEFT does). With ``seed``, each module's
    are drawn from a generator seeded by (seed, its global module name) instead, so every
    tensor and pipeline split of the model starts from the same adapter.
    """
    planned = []
    for name, layer, kind, module in iter_linear_modules(model):
        tp = module.tp_group.size() if module.tp_group is not None else 1
        spec = adapter_spec_for(config, _model_facts(module), layer, kind, tp)
        if spec is None:
            continue
        if adapter_name in getattr(module, "lora_specs", {}):
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
        planned.append((module, spec, megatron_module_name(layer, kind)))
    for module, spec, global_name in planned:
        generator = None if seed is None else torch.Generator().manual_seed(_module_seed(seed, global_name))
        add_lora_support(module).add_adapter(adapter_name, spec, dtype=dtype, generator=generator)
    return len(planned)


def _module_seed(seed: int, name: str) -> int:
    # A stable hash (Python's hash() of a str changes between processes).
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def apply_lora(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    seed: Optional[int] = None,
) -> nn.Module:
    """Add adapter ``adapter_name`` to every matching parallel linear; freeze the rest.

    Works on any module tree containing megatron-core TransformerLayers (a GPTModel in
    particular). Adapter weights are created in ``dtype`` (fp32 by default, also on a
    bf16/fp16 base). ``seed``: as in :func:`add_adapters`. Returns ``model``.
    """
    if add_adapters(model, config, adapter_name, dtype, seed) == 0:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of the model")
    return freeze_base(model)


def freeze_base(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the LoRA factors."""
    for _, param in model.named_parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
            p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module, adapters: Optional[Iterable[str]] = None) -> nn.Module:
    """Merge the active (or given) adapters into the TP-local base weights."""
    for _, layer in lora_layers(model):
        layer.merge(adapters)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (bit-exact on an fp32 base)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def set_adapters(model: nn.Module, names: Iterable[str]) -> None:
    """Make ``names`` the active adapters (their outputs add up)."""
    names = list(names)
    for _, layer in lora_layers(model):
        layer.set_active_adapters([n for n in names if n in layer.lora_specs])


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    """Switch every LoRA layer on or off (off: the base model's outputs)."""
    for _, layer in lora_layers(model):
        if not enabled and layer.merged_adapters:
            raise ValueError("cannot disable merged adapters: call unmerge_lora first")
        layer.lora_disabled = not enabled


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts, both this rank's and the whole model's.

    Whole-model counts add TP-split tensors over the TP group and count replicated ones
    once (pipeline stages are not summed).
    """
    local, split = [0, 0], [0, 0]
    for p in model.parameters():
        n = (p.numel() * p.requires_grad, p.numel())
        local = [a + b for a, b in zip(local, n)]
        if getattr(p, "tensor_model_parallel", False):
            split = [a + b for a, b in zip(split, n)]
    from megatron.core import parallel_state

    # Only the TP-split counts differ between ranks; the sum is a device tensor (NCCL needs one).
    split_sum = torch.tensor(split, dtype=torch.float64, device=device())
    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        torch.distributed.all_reduce(split_sum, group=parallel_state.get_tensor_model_parallel_group())
    total = [int(s) + (l - t) for s, l, t in zip(split_sum.tolist(), local, split)]
    return {
        "trainable": total[0],
        "total": total[1],
        "local_trainable": local[0],
        "local_total": local[1],
    }


def trainable_parameters_report(model: nn.Module) -> str:
    """PEFT-style one-line report of :func:`trainable_parameters`."""
    c = trainable_parameters(model)
    return (
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
        f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f} "
        f"(this rank: {c['local_trainable']:,} of {c['local_total']:,})"
    )


class LoraTransformerLayer(TransformerLayer):
    """A TransformerLayer that builds its LoRA adapters as it is constructed."""

    def __init__(self, *args, lora_config: LoraConfig, adapter_name: str = "default", **kwargs):
        super().__init__(*args, **kwargs)
        add_adapters(self, lora_config, adapter_name)


def lora_layer_spec(spec: ModuleSpec, config: LoraConfig, adapter_name: str = "default") -> ModuleSpec:
    """Turn a GPT transformer-layer spec into one whose layers carry LoRA from construction.

    Same weights give the same outputs as ``apply_lora`` on a model built from ``spec``.
    Unlike ``apply_lora`` it freezes nothing: call :func:`freeze_base` on the built model.
    """
    if spec.module is not TransformerLayer:
        raise ValueError(f"lora_layer_spec expects a TransformerLayer spec, got {spec.module!r}")
    params = dict(spec.params or {}, lora_config=config, adapter_name=adapter_name)
    return ModuleSpec(module=LoraTransformerLayer, params=params, submodules=spec.submodules)
