"""Adapter state of a model <-> our Megatron adapter checkpoint (``checkpoint``).

MoE experts: a checkpoint holds every expert once, split over the files' TP size like a dense
module (``formats.checkpoint``), whatever expert-parallel and expert-TP sizes saved it. Saving
gathers each expert's factors over expert TP and the experts over expert parallelism, then
every TP rank writes its slice; loading gives each rank its experts' slices at its expert-TP
size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from megatron_lora.formats.checkpoint import (
    CHECKPOINT_FACTORS,
    ModuleTable,
    checkpoint_config,
    key_split,
    local_part,
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
    lora_module,
    site_segment,
    tie_output_layer,
    tied_config,
)
from megatron_lora.formats.outputs import shared_atomic_directory
from megatron_lora.parallel.lora_layers import AdapterSpec, LoraLayer, unshard_rows


def _tp() -> tuple[int, int]:
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _adapted_sites(model: nn.Module, adapter_name: str) -> Iterator[LinearSite]:
    for site in iter_linear_sites(model):
        if isinstance(site.module, LoraLayer) and adapter_name in site.module.lora_specs:
            yield site


def adapts_experts(model: nn.Module, adapter_name: str = "default") -> bool:
    """Whether ``adapter_name`` adapts an MoE expert or router of ``model`` on this rank."""
    return any(site.moe is not None for site in _adapted_sites(model, adapter_name))


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """This rank's tensors of ``adapter_name`` under checkpoint keys (global layer indices)."""
    out = {}
    for site in _adapted_sites(model, adapter_name):
        for factor, seg, p in _adapter_tensors(site.module, adapter_name):
            out[module_key(site.global_name, factor, seg)] = p.detach()
    return out


def _adapter_tensors(layer: LoraLayer, adapter_name: str) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(factor, segment, parameter) of every tensor of ``adapter_name`` on ``layer``, DoRA
    magnitudes included, as checkpoint keys name them."""
    for factor in CHECKPOINT_FACTORS:
        tensors = getattr(layer, factor)
        if adapter_name in tensors:
            for seg, p in tensors[adapter_name].items():
                yield factor, seg, p


def _is_expert(site: LinearSite) -> bool:
    return site.moe is not None and site.moe.expert is not None


def _gather_split(t: torch.Tensor, dim: Optional[int], blocks: int, group) -> torch.Tensor:
    """The whole factor from every rank's slice of ``group`` (``dim`` None: replicated)."""
    world = dist.get_world_size(group)
    if dim is None or world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return unshard_rows(parts, blocks) if dim == 0 else torch.cat(parts, dim)


def _expert_shards(model: nn.Module, adapter_name: str, tp_rank: int, tp: int) -> tuple[dict, ModuleTable]:
    """Every expert's factors of ``adapter_name`` (and their table entries), split for TP
    rank ``tp_rank`` of ``tp`` as a dense module is: gathered over expert TP, then over
    expert parallelism. Collective over the expert groups (every rank takes part)."""
    state: dict[str, torch.Tensor] = {}
    table = adapter_module_table(model, adapter_name, experts=True)
    for site in _adapted_sites(model, adapter_name):
        if not _is_expert(site):
            continue
        for factor, seg, p in _adapter_tensors(site.module, adapter_name):
            key = module_key(site.global_name, factor, seg)
            dim, blocks = key_split(table, key)
            state[key] = _gather_split(p.detach(), dim, blocks, site.module.tp_group).cpu()
    if ps.get_expert_model_parallel_world_size() > 1:
        parts = [None] * ps.get_expert_model_parallel_world_size()
        dist.all_gather_object(parts, (state, table), group=ps.get_expert_model_parallel_group())
        state = {k: v for part, _ in parts for k, v in part.items()}
        table = {k: v for _, part in parts for k, v in part.items()}
    out = {}
    for key, full in state.items():
        dim, blocks = key_split(table, key)
        if dim is not None and full.shape[dim] % (tp * blocks):
            raise ValueError(f"cannot save {key} at tensor parallel size {tp}: its {full.shape[dim]} split rows do not divide")
        out[key] = full if dim is None else local_part(full, dim, blocks, tp_rank, tp, None)
    return out, table


def adapter_module_table(model: nn.Module, adapter_name: str = "default", experts: Optional[bool] = None) -> ModuleTable:
    """The checkpoint's ``modules`` table of this rank's modules carrying ``adapter_name``
    (``experts``: only the MoE experts' (True) or all but theirs (False))."""
    table = {}
    for site in _adapted_sites(model, adapter_name):
        if experts is not None and experts != _is_expert(site):
            continue
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
    writes; the directory appears only when complete. MoE experts are gathered over expert
    TP and expert parallelism and written split over TP like a dense module.
    """
    tp_rank, tp = _tp()
    experts, expert_table = _expert_shards(model, adapter_name, tp_rank, tp)
    dense = adapter_module_table(model, adapter_name, experts=False)
    state = {k: v for k, v in adapter_state_dict(model, adapter_name).items() if split_key(k)[0] in dense}
    state.update(experts)
    table = {**dense, **expert_table}
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


def _group_rank_size(module: nn.Module) -> tuple[int, int]:
    """(rank, size) in the group a module's factors are split over (its ``tp_group``)."""
    group = getattr(module, "tp_group", None)
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


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
    return AdapterSpec(tuple(segments), dropout=config.lora_dropout, init=config.init_lora_weights, dora=config.use_dora)


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
    # Every expert of an adapted expert module (a model holds them all, over its ranks).
    adapted = {(s.moe.layer, s.moe.module) for s in sites if _is_expert(s)}
    for s in iter_linear_sites(model):
        if _is_expert(s) and (s.moe.layer, s.moe.module) in adapted and s.global_name not in a_keys:
            raise ValueError(f"{source}: holds LoRA tensors for other experts of layer {s.moe.layer}'s "
                             f"{s.moe.module} but none for {s.global_name}")
    # An expert's linear is split over the expert-TP group (its tp_group), any other over TP.
    specs = [(s, adapter_spec_for_keys(s, a_keys[s.global_name], reader, config, _group_rank_size(s.module)[1]))
             for s in sites]
    if any(adapter_name in getattr(s.module, "lora_specs", {}) for s in sites):  # checked before any module changes
        raise ValueError(f"adapter {adapter_name!r} already exists on this model")
    used = set()
    for site, spec in specs:
        lora = lora_module(site, model)
        lora.add_adapter(adapter_name, spec)
        rank, size = _group_rank_size(lora)
        for factor, seg, p in _adapter_tensors(lora, adapter_name):
            key = module_key(site.global_name, factor, seg)
            t = reader.local(key, rank, size)
            if t.shape != p.shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
            p.data = p.data.to(t.dtype)
            used.add(key)
    if tie:
        _load_tied(model, reader, config, adapter_name, tp_rank, tp)
    spread = ps.model_parallel_is_initialized() and max(
        ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()) > 1
    if dist.is_initialized() and spread:  # stages and expert-parallel ranks each load their modules
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, used)
        used = set().union(*parts)
    missing = [k for k in keys if k not in used]
    if missing:
        raise ValueError(f"{source}: tensors for modules this model lacks: {missing[:4]}")
