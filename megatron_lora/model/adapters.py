"""Adapter state of a model <-> our Megatron adapter checkpoint (``checkpoint``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from megatron_lora.formats.checkpoint import checkpoint_config, make_key, parse_key, write_config, write_shard
from megatron_lora.config import LoraConfig
from megatron_lora.formats.detect import AdapterReader
from megatron_lora.formats.peft import open_adapter
from megatron_lora.model.gpt import real_vocab_size
from megatron_lora.hf.layout import ModelFacts, hf_module_name, megatron_module_name
from megatron_lora.model.lora import freeze_base, iter_linear_modules
from megatron_lora.formats.outputs import shared_atomic_directory
from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, LoraLayer, add_lora_support


def _tp() -> tuple[int, int]:
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """This rank's tensors of ``adapter_name`` under checkpoint keys (global layer indices)."""
    out = {}
    for _, layer, kind, module in iter_linear_modules(model):
        if isinstance(module, LoraLayer) and adapter_name in module.lora_specs:
            for factor in ("lora_A", "lora_B"):
                for seg, p in getattr(module, factor)[adapter_name].items():
                    out[make_key(layer, kind, factor, seg)] = p.detach()
    return out


def model_facts(model: nn.Module) -> ModelFacts:
    return ModelFacts.from_transformer_config(model.config, real_vocab_size(model))


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    config: LoraConfig,
    adapter_name: str = "default",
    overwrite: bool = False,
    extra: Optional[dict] = None,
) -> None:
    """Save ``adapter_name`` as a megatron-lora checkpoint; call on every rank.

    Pipeline stages are merged into one file per TP rank; the first data-parallel replica
    writes; the directory appears only when complete.
    """
    tp_rank, tp = _tp()
    state = adapter_state_dict(model, adapter_name)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        # Pickled for the gather: CPU tensors unpickle on any rank (they go to a file next).
        state = {k: v.cpu() for k, v in state.items()}
        dist.all_gather_object(parts, state, group=ps.get_pipeline_model_parallel_group())
        state = {k: v for part in parts for k, v in part.items()}
    with shared_atomic_directory(directory, overwrite) as tmp:
        if ps.get_data_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
            write_shard(tmp, tp_rank, state)
        if dist.get_rank() == 0:
            cfg = checkpoint_config("lora", tp, model_facts(model), config.to_dict())
            write_config(tmp, {**cfg, **(extra or {})})


def adapter_specs_from_keys(
    keys: list[str], reader: AdapterReader, config: LoraConfig, facts: ModelFacts, tp: int
) -> dict[tuple[int, str], AdapterSpec]:
    """Per (global layer, module): the segments present in a checkpoint's keys.

    Ranks come from the tensors' shapes and scalings from the config (by the HF name of a
    projection segment, the Megatron name of a shared one), never from re-matching targets.
    """
    segs: dict[tuple[int, str], list[Segment]] = {}
    for key in keys:
        layer, module, factor, seg = parse_key(key)
        if factor != "lora_A":
            continue
        r = reader.shape(key)[0]
        proj = None if seg == module else seg
        if proj is not None and proj not in facts.projections(module):
            raise ValueError(f"{key}: segment {seg!r} does not belong to {module}")
        name = megatron_module_name(layer, module) if proj is None else hf_module_name(layer, proj)
        geometry = facts.segment_geometry(module, proj, tp)
        segs.setdefault((layer, module), []).append(
            Segment(name=seg, r=r, scaling=config.scaling(name), **geometry)
        )
    return {
        k: AdapterSpec(tuple(v), dropout=config.lora_dropout, init=config.init_lora_weights)
        for k, v in segs.items()
    }


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    freeze: bool = True,
) -> LoraConfig:
    """Add ``adapter_name`` from a PEFT LoRA directory or a megatron-lora checkpoint (any TP).

    Call on every rank after ``init_distributed``; each rank reads only its own slices. The
    adapter must fit the model (a checkpoint's model facts, a PEFT tensor's shape: an error
    names the module and both shapes). The base is frozen unless ``freeze=False``. Returns
    the adapter's LoraConfig.
    """
    reader, config = open_adapter(directory, model_facts(model))
    add_adapter_from_reader(model, reader, config, adapter_name, str(directory))
    if freeze:
        freeze_base(model)
    return config


def add_adapter_from_reader(
    model: nn.Module, reader: AdapterReader, config: LoraConfig, adapter_name: str, source: str
) -> None:
    """Add ``adapter_name`` with the segments of ``reader``'s keys and copy this rank's tensors.

    ``reader`` has ``keys()``, ``shape(key)`` and ``local(key, tp_rank, tp_size)`` over
    checkpoint keys (:class:`ShardReader`, or ``peft_format.PeftReader`` for PEFT files).
    """
    facts = model_facts(model)
    tp_rank, tp = _tp()
    keys = reader.keys()
    specs = adapter_specs_from_keys(keys, reader, config, facts, tp)
    modules = [(layer, kind, module) for _, layer, kind, module in iter_linear_modules(model) if (layer, kind) in specs]
    taken = [m for _, _, m in modules if adapter_name in getattr(m, "lora_specs", {})]
    if taken:  # checked before any module changes
        raise ValueError(f"adapter {adapter_name!r} already exists on this model")
    used = set()
    for layer, kind, module in modules:
        spec = specs[(layer, kind)]
        lora = add_lora_support(module)
        lora.add_adapter(adapter_name, spec)
        for factor in ("lora_A", "lora_B"):
            for seg, p in getattr(lora, factor)[adapter_name].items():
                key = make_key(layer, kind, factor, seg)
                t = reader.local(key, tp_rank, tp)
                if t.shape != p.shape:
                    raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
                p.data = p.data.to(t.dtype)
                used.add(key)
    stage_layers = {layer for _, layer, _, _ in iter_linear_modules(model)}
    missing = [k for k in keys if parse_key(k)[0] in stage_layers and k not in used]
    if missing:
        raise ValueError(f"{source}: tensors for modules this model lacks: {missing[:4]}")
