"""Adapter state of a model <-> our Megatron adapter checkpoint (``checkpoint``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from megatron_lora.formats.checkpoint import (
    ModuleTable,
    checkpoint_config,
    module_key,
    split_key,
    tied_modules,
    write_config,
    write_shard,
)
from megatron_lora.config import LoraConfig
from megatron_lora.formats.detect import AdapterReader
from megatron_lora.formats.peft import open_adapter
from megatron_lora.model.gpt import real_vocab_size
from megatron_lora.hf.layout import EMBED_TOKENS, EMBEDDING_PATH, OUTPUT_LAYER, ModelFacts
from megatron_lora.model.lora import (
    LinearSite,
    freeze_base,
    iter_linear_sites,
    layout_facts,
    site_segment,
    tie_output_layer,
    tied_config,
)
from megatron_lora.formats.outputs import shared_atomic_directory
from megatron_lora.parallel.lora_layers import AdapterSpec, LoraLayer, add_lora_support


def _tp() -> tuple[int, int]:
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _adapted_sites(model: nn.Module, adapter_name: str) -> Iterator[LinearSite]:
    for site in iter_linear_sites(model):
        if isinstance(site.module, LoraLayer) and adapter_name in site.module.lora_specs:
            yield site


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """This rank's tensors of ``adapter_name`` under checkpoint keys (global layer indices)."""
    out = {}
    for site in _adapted_sites(model, adapter_name):
        if adapter_name not in site.module.lora_A:
            continue  # tied: the embedding's tensors
        for factor in ("lora_A", "lora_B"):
            for seg, p in getattr(site.module, factor)[adapter_name].items():
                out[module_key(site.global_name, factor, seg)] = p.detach()
    return out


def adapter_module_table(model: nn.Module, adapter_name: str = "default") -> ModuleTable:
    """The checkpoint's ``modules`` table of this rank's modules carrying ``adapter_name``."""
    table = {}
    for site in _adapted_sites(model, adapter_name):
        module = site.module
        table[site.global_name] = {
            "parallel": module.parallel_mode,
            "segments": {s.name: {"blocks": s.blocks} for s in module.lora_specs[adapter_name].segments},
        }
        if adapter_name in getattr(module, "lora_tied_names", {}):
            table[site.global_name]["tied"] = module.lora_tied_names[adapter_name][1]
    return table


def model_facts(model: nn.Module) -> Optional[ModelFacts]:
    """The layout facts of a GPT model (None for any other module tree)."""
    vocab = real_vocab_size(model)
    return ModelFacts.from_transformer_config(model.config, vocab) if vocab and hasattr(model, "config") else None


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
    state, table = adapter_state_dict(model, adapter_name), adapter_module_table(model, adapter_name)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        # Pickled for the gather: CPU tensors unpickle on any rank (they go to a file next).
        dist.all_gather_object(parts, ({k: v.cpu() for k, v in state.items()}, table), group=ps.get_pipeline_model_parallel_group())
        state = {k: v for part, _ in parts for k, v in part.items()}
        table = {k: v for _, part in parts for k, v in part.items()}
    if tied_modules(table):
        config = config.for_tied_model()  # the config the adapters were added with, as PEFT saves it
    with shared_atomic_directory(directory, overwrite) as tmp:
        if ps.get_data_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
            write_shard(tmp, tp_rank, state)
        if dist.get_rank() == 0:
            # The LLaMA-family layout's modules need the facts, also outside a GPT model.
            layout = next((site for site in _adapted_sites(model, adapter_name) if site.kind is not None), None)
            facts = model_facts(model) or (layout_facts(layout.module) if layout is not None else None)
            cfg = checkpoint_config("lora", tp, facts, config.to_dict(), modules=table)
            write_config(tmp, {**cfg, **(extra or {})})


def _load_tied(model: nn.Module, reader: AdapterReader, config: LoraConfig, adapter_name: str, tp_rank: int,
               tp: int) -> None:
    """Tie the output layer's adapter to the embedding's (loaded first); a copy on a later
    pipeline stage than the embedding reads the embedding's tensors."""
    a_key, b_key = (module_key(EMBEDDING_PATH, f, EMBED_TOKENS) for f in ("lora_A", "lora_B"))
    if a_key not in reader.keys():
        raise ValueError("ensure_weight_tying ties lm_head's adapter to embed_tokens', which has no tensors")
    a, b = reader.local(a_key, tp_rank, tp), reader.local(b_key, tp_rank, tp)
    tie_output_layer(model, config, adapter_name, a.dtype, r=a.shape[0])
    for site in iter_linear_sites(model):
        copies = getattr(site.module, "lora_tied", {}) if site.kind == OUTPUT_LAYER else {}
        if adapter_name in copies:
            with torch.no_grad():
                copies[adapter_name]["A"].copy_(a)
                copies[adapter_name]["B"].copy_(b)


def adapter_spec_for_keys(site: LinearSite, keys: list[str], reader: AdapterReader, config: LoraConfig, tp: int) -> AdapterSpec:
    """The spec of the segments whose lora_A ``keys`` a checkpoint holds for ``site``.

    Ranks come from the tensors' shapes and scalings from the config (by the name each
    segment matches under), never from re-matching targets.
    """
    segments = []
    for key in keys:
        _, _, seg = split_key(key)
        segments.append(site_segment(site, seg, reader.shape(key)[0], config, tp))
    return AdapterSpec(tuple(segments), dropout=config.lora_dropout, init=config.init_lora_weights)


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
    Under pipeline parallelism each stage loads its modules; every key must find its module
    on some stage.
    """
    tp_rank, tp = _tp()
    tie, config = tied_config(model, config)
    tied = tied_modules(reader.modules)
    if tied and not tie:
        raise ValueError(f"{source}: its lm_head adapter is tied to embed_tokens' (ensure_weight_tying), but the "
                         "model's output layer does not share the embedding's weight")
    keys = reader.keys()
    a_keys: dict[str, list[str]] = {}
    for key in keys:
        module, factor, _ = split_key(key)
        if factor == "lora_A":
            a_keys.setdefault(module, []).append(key)
    if tie and OUTPUT_LAYER in a_keys:
        raise ValueError(f"{source}: holds lm_head tensors of its own, but ensure_weight_tying ties lm_head's "
                         "adapter to embed_tokens' on this model")
    sites = [s for s in iter_linear_sites(model) if s.global_name in a_keys]
    specs = [(s, adapter_spec_for_keys(s, a_keys[s.global_name], reader, config, tp)) for s in sites]
    if any(adapter_name in getattr(s.module, "lora_specs", {}) for s in sites):  # checked before any module changes
        raise ValueError(f"adapter {adapter_name!r} already exists on this model")
    used = set()
    for site, spec in specs:
        lora = add_lora_support(site.module)
        lora.add_adapter(adapter_name, spec)
        for factor in ("lora_A", "lora_B"):
            for seg, p in getattr(lora, factor)[adapter_name].items():
                key = module_key(site.global_name, factor, seg)
                t = reader.local(key, tp_rank, tp)
                if t.shape != p.shape:
                    raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
                p.data = p.data.to(t.dtype)
                used.add(key)
    if tie:
        _load_tied(model, reader, config, adapter_name, tp_rank, tp)
    if dist.is_initialized() and ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, used, group=ps.get_pipeline_model_parallel_group())
        used = set().union(*parts)
    missing = [k for k in keys if k not in used]
    if missing:
        raise ValueError(f"{source}: tensors for modules this model lacks: {missing[:4]}")
