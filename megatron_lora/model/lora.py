"""apply_lora and friends: add LoRA adapters to megatron-core models by PEFT's rules."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.moe import experts as moe_experts
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from megatron_lora.config import LoraConfig
from megatron_lora.hf.layout import (
    ALL_LINEAR,
    EMBED_TOKENS,
    EMBEDDING,
    EMBEDDING_PATH,
    LM_HEAD,
    MODULE_PATH,
    OUTPUT_LAYER,
    ROUTER,
    ModelFacts,
    MoeModule,
    global_expert_path,
    hf_module_name,
    is_expert_parameter,
    moe_segment_geometry,
    parse_moe_module,
)
from megatron_lora.model.gpt import real_vocab_size
from megatron_lora.parallel.lora_layers import (
    AdapterSpec,
    LoraLayer,
    LoraVocabParallelEmbedding,
    Segment,
    add_lora_support,
    lora_layers,
)
from megatron_lora.parallel.device import device


@dataclass(frozen=True)
class LinearSite:
    """A parallel linear of a model, named as adapter matching and checkpoints see it."""

    #: The module's dotted name in the model.
    name: str
    #: ``name`` with the enclosing TransformerLayer's index made global (pipeline stages
    #: number their ``decoder.layers.{i}`` from 0).
    global_name: str
    #: The enclosing TransformerLayer's global index (None outside one: matching then reads
    #: the index from the name by PEFT's rule).
    layer: Optional[int]
    #: Megatron module of the LLaMA-family layout (``linear_qkv`` ... and a GPT model's
    #: ``output_layer``; HF names alias its projections), or None for any other parallel linear.
    kind: Optional[str]
    module: nn.Module
    #: An MoE layer's expert linear or router (``global_name`` has the GLOBAL expert index).
    moe: Optional[MoeModule] = None


#: GPT-model modules adapted as a whole -> their HF name (``output_layer`` is ``lm_head``).
_WHOLE = {OUTPUT_LAYER: LM_HEAD, EMBEDDING: EMBED_TOKENS}
#: The modules LoRA wraps.
PARALLEL_LINEARS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, TopKRouter)
#: MoE experts LoRA cannot adapt: grouped-GEMM experts (no per-expert linears) and shared experts.
#: (megatron-core 0.19 has no GroupedMLP: the classes present are listed.)
_UNSUPPORTED_EXPERTS = {
    **{getattr(moe_experts, n): f"grouped-GEMM experts ({n})" for n in ("GroupedMLP", "TEGroupedMLP") if hasattr(moe_experts, n)},
    SharedExpertMLP: "shared experts (SharedExpertMLP)",
}


def iter_linear_sites(model: nn.Module, config: Optional[LoraConfig] = None) -> Iterator[LinearSite]:
    """Every ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding / MoE router
    (subclasses included) of ``model``.

    With ``config``, any other module that its targets name is refused (TypeError naming
    the class), as PEFT refuses a module type it cannot wrap, and so are grouped-GEMM and
    shared experts that it would adapt (ValueError). ``"all-linear"`` names every torch
    ``nn.Linear`` but the output layer, as in PEFT: one that is not a parallel linear (e.g.
    a replicated down projection of multi-latent attention) is refused, not skipped.
    """
    owners: dict[str, TransformerLayer] = {}
    inside_linear: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_linear):
            continue  # a LoRA layer's own containers
        if isinstance(module, TransformerLayer):
            owners[name] = module
        owner = next((p for p in _prefixes(name) if p in owners), None)
        global_name, layer, kind, moe = name, None, None, None
        if owner is not None:
            index = owners[owner].layer_number - 1
            head, _, last = owner.rpartition(".")
            inner = name[len(owner) :].lstrip(".")
            if hasattr(owners[owner].mlp, "local_expert_indices"):
                inner = global_expert_path(inner, owners[owner].mlp.local_expert_indices)
            if last.isdigit():
                global_name = f"{head + '.' if head else ''}{index}{'.' + inner if inner else ''}"
            layer = index
            kind = next((k for k, path in MODULE_PATH.items() if inner == path), None)
            moe = parse_moe_module(f"decoder.layers.{index}.{inner}")
        elif name in (OUTPUT_LAYER, EMBEDDING_PATH) and real_vocab_size(model):
            kind = name.rsplit(".", 1)[-1]  # a GPT model's: HF's lm_head, embed_tokens
        if config is not None and layer is not None:
            _refuse_unsupported_experts(config, global_name, layer, module)
        if isinstance(module, PARALLEL_LINEARS):
            inside_linear.append(name)
            yield LinearSite(name, global_name, layer, kind, module, moe)
        elif (config is not None and name and (config.target_modules != ALL_LINEAR or isinstance(module, nn.Linear))
              and config.matches(global_name, layer, any_linear=True)):
            cls = type(module)
            raise TypeError(
                f"target_modules={config.target_modules!r} matches {global_name!r}, a "
                f"{cls.__module__}.{cls.__qualname__}: LoRA supports megatron-core's "
                "ColumnParallelLinear and RowParallelLinear (and their subclasses) only"
            )


def _refuse_unsupported_experts(config: LoraConfig, name: str, layer: int, module: nn.Module) -> None:
    """Refuse, by name, grouped-GEMM or shared experts that ``config`` would adapt."""
    what = next((v for cls, v in _UNSUPPORTED_EXPERTS.items() if isinstance(module, cls)), None)
    if what is None:
        return
    if isinstance(module, SharedExpertMLP):  # by its Megatron names, or Qwen2-MoE's HF names
        names = [f"{name}.{m}" for m in ("linear_fc1", "linear_fc2")]
        names += [f"model.layers.{layer}.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        targeted = any(config.matches(n, layer) for n in names)
    else:  # the names its experts would have as SequentialMLP experts
        targeted = any(config.moe_segment_name(MoeModule(layer, 0, m), seg) is not None
                       for m in ("linear_fc1", "linear_fc2") for seg in (m, *MoeModule(layer, 0, m).projections()))
    if targeted:
        raise ValueError(f"LoRA on {what} at {name} is not supported: build the model with megatron-core's "
                         "SequentialMLP experts (local spec) and no shared experts")


def _prefixes(name: str) -> Iterator[str]:
    """``name`` and its enclosing module names, innermost first ("" last)."""
    while name:
        yield name
        name = name.rpartition(".")[0]
    yield ""


def iter_linear_modules(model: nn.Module) -> Iterator[tuple[str, int, str, nn.Module]]:
    """(name, global layer index, Megatron module kind, module) of the LLaMA-family layout's
    linears (the sites with a ``kind``)."""
    for site in iter_linear_sites(model):
        if site.kind is not None:
            yield site.name, site.layer, site.kind, site.module


def layout_facts(module: nn.Module) -> ModelFacts:
    """The layout facts of a module's TransformerConfig (no vocabulary)."""
    return ModelFacts.from_transformer_config(module.config, vocab_size=0)


def match_name(site: LinearSite, segment: str, config: Optional[LoraConfig] = None) -> str:
    """The name a segment of ``site`` matches targets and takes ``rank_pattern`` /
    ``alpha_pattern`` under: the HF name of a projection segment, else the module's own; on
    an MoE module, the name ``config`` adapts it under (``LoraConfig.moe_segment_name``)."""
    if site.moe is not None:
        return (config and config.moe_segment_name(site.moe, segment)) or site.moe.hf_names(segment)[0]
    if site.kind is not None and segment != site.kind:
        return hf_module_name(site.layer, segment)
    return site.global_name


def site_segment(site: LinearSite, segment: str, r: int, config: LoraConfig, tp: int) -> Segment:
    """Segment ``segment`` of rank ``r`` on ``site``: the rows of a projection where the
    LLaMA-family layout or the MoE layout is known, else the whole output."""
    if site.moe is not None:
        geometry = moe_segment_geometry(site.moe, segment, site.module.weight.shape[0], site.module.config.gated_linear_unit)
    elif site.kind is None or site.kind in _WHOLE:
        allowed = (site.global_name.rsplit(".", 1)[-1], *([_WHOLE[site.kind]] if site.kind else []))
        if segment not in allowed:
            raise ValueError(f"{site.global_name} has no segment {segment!r} (one LoRA over the module: {allowed})")
        geometry = dict(width=_local_rows(site.module))  # output layer and embedding: the padded vocabulary
    else:
        facts = layout_facts(site.module)
        proj = None if segment == site.kind else segment
        if proj is not None and proj not in facts.projections(site.kind):
            raise ValueError(f"{site.global_name}: segment {segment!r} does not belong to {site.kind}")
        geometry = facts.segment_geometry(site.kind, proj, tp)
    return Segment(name=segment, r=r, scaling=config.scaling(match_name(site, segment, config)), **geometry)


def _local_rows(module: nn.Module) -> int:
    """Rows of a layer's TP-local output (an output layer tied to the embedding owns no weight)."""
    return module.weight.shape[0] if module.weight is not None else module.output_size_per_partition


def adapter_spec_for(config: LoraConfig, site: LinearSite, tp: int) -> Optional[AdapterSpec]:
    """The segments ``config`` puts on ``site`` (None: not adapted).

    A site of the LLaMA-family layout matches by its Megatron name (one shared-A segment) or
    by the HF names of its projections (one segment each); any other site matches by its
    Megatron name only and gets one segment over its whole output, named like the module.
    """
    if site.moe is not None:
        names = _moe_segments(config, site)
    elif site.kind is None:
        linear = not isinstance(site.module, VocabParallelEmbedding)  # all-linear: linears only
        if not config.matches(site.global_name, site.layer, any_linear=linear):
            return None
        names = [site.global_name.rsplit(".", 1)[-1]]
    else:
        kind, layer = site.kind, site.layer
        shared = config.matches(site.global_name, layer)
        every = (_WHOLE[kind],) if kind in _WHOLE else layout_facts(site.module).projections(kind)
        projections = [p for p in every if config.matches(hf_module_name(layer, p), layer)]
        if shared and projections:
            raise ValueError(
                f"target_modules={config.target_modules!r} names both {kind} and {projections} on "
                f"layer {layer}: use Megatron names (shared A) or HF names (per projection), not both"
            )
        names = [kind] if shared else projections
    if not names:
        return None
    if config.use_dora and (site.moe is not None or site.module.weight is None):
        # PEFT refuses DoRA through target_parameters, the layout transformers 5 gives experts;
        # DoRA's norm needs the weight, which a tied output layer only receives at call time.
        raise ValueError(f"use_dora: DoRA on {site.global_name} is not supported (MoE experts and the router, "
                         "an output layer tied to the embedding)")
    segments = tuple(site_segment(site, n, config.rank_alpha(match_name(site, n, config))[0], config, tp) for n in names)
    return AdapterSpec(segments, dropout=config.lora_dropout, init=config.init_lora_weights, dora=config.use_dora)


def lora_module(site: LinearSite, model: nn.Module) -> LoraLayer:
    """``site``'s module turned into its LoRA class; a GPT model's embedding learns its
    unpadded vocabulary (DoRA's norm over the vocabulary skips the TP padding)."""
    lora = add_lora_support(site.module)
    if site.kind == EMBEDDING:
        lora.lora_vocab_size = real_vocab_size(model)
    return lora


def _moe_segments(config: LoraConfig, site: LinearSite) -> list[str]:
    """The segments ``config`` puts on an expert's linear or the router: the module's own (by
    its Megatron name or ``target_parameters``) or its HF projections (by their HF names)."""
    moe = site.moe
    if moe.module == ROUTER:
        return [ROUTER] if config.moe_segment_name(moe, ROUTER) else []
    projections = [p for p in moe.projections(site.module.config.gated_linear_unit) if config.moe_segment_name(moe, p)]
    whole = config.moe_segment_name(moe, moe.module)
    if whole is not None and projections:
        raise ValueError(
            f"the config names both {whole} and the HF projections {projections} of {site.global_name}: "
            "adapt an expert's module whole (Megatron name or target_parameters) or per HF projection, not both"
        )
    both = config.matches_any(moe.hf_names(moe.module), moe.layer) and config.matches_parameter(moe.parameter)
    if both:
        raise ValueError(f"{site.global_name} is targeted by both target_modules and target_parameters "
                         f"({moe.parameter}): PEFT refuses the same, choose one")
    return [moe.module] if whole is not None else projections


def add_adapters(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 dtype: torch.dtype = torch.float32, seed: Optional[int] = None) -> int:
    """Add adapter ``adapter_name`` to every matching parallel linear; return how many.

    Every module is checked before any is changed, so an error leaves the model as it was.
    The factors are drawn from the default RNG (as PEFT does). With ``seed``, each module's
    are drawn from a generator seeded by (seed, its global module name) instead, so every
    tensor and pipeline split of the model starts from the same adapter.

    On a GPT model whose output layer shares the embedding's weight, ``ensure_weight_tying``
    ties the output layer's adapter to the embedding's as PEFT does (:func:`tied_config`).
    """
    tie, config = tied_config(model, config)
    planned, tied = [], []
    for site in iter_linear_sites(model, config):
        module = site.module
        tp = module.tp_group.size() if module.tp_group is not None else 1
        tied_here = tie and site.kind == OUTPUT_LAYER  # tied after the embedding is adapted
        spec = None if tied_here else adapter_spec_for(config, site, tp)
        if spec is None and not tied_here:
            continue
        if adapter_name in getattr(module, "lora_specs", {}):
            raise ValueError(f"adapter {adapter_name!r} already exists on {site.name}")
        if tied_here:
            tied.append(site)
        else:
            planned.append((site, spec))
    for site, spec in planned:
        generator = None if seed is None else torch.Generator().manual_seed(_module_seed(seed, site.global_name))
        lora_module(site, model).add_adapter(adapter_name, spec, dtype=dtype, generator=generator)
    if tie:
        tie_output_layer(model, config, adapter_name, dtype)
        sync_tied_adapters(model)
    return len(planned) + len(tied)


def tied_config(model: nn.Module, config: LoraConfig) -> tuple[bool, LoraConfig]:
    """(whether the output layer's adapter is tied to the embedding's, the config adapters are
    added with) on ``model``, as PEFT decides them: tying rewrites the targets
    (:meth:`LoraConfig.for_tied_model`). PEFT's warning about targets on tied weights is
    given once, on rank 0."""
    tied_model = bool(getattr(model, "share_embeddings_and_output_weights", False))
    message = config.tying_warning(tied_model)
    if message is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        warnings.warn(message, stacklevel=3)
    if not config.ties_adapters(tied_model):
        return False, config
    if config.use_dora:
        raise ValueError("use_dora with ensure_weight_tying: DoRA on tied embedding and lm_head adapters is not supported")
    config = config.for_tied_model()
    if not config.matches(hf_module_name(None, EMBED_TOKENS)):
        raise ValueError(
            f"ensure_weight_tying=True ties lm_head's adapter to embed_tokens', but exclude_modules="
            f"{config.exclude_modules!r} / layers_to_transform={config.layers_to_transform!r} leave the embedding unadapted"
        )
    return True, config


def tie_output_layer(model: nn.Module, config: LoraConfig, adapter_name: str, dtype: torch.dtype = torch.float32,
                     r: Optional[int] = None) -> None:
    """Tie this stage's output layer's adapter ``adapter_name`` to the embedding's (added
    first; ``r`` its rank, default the config's). On a pipeline stage without the embedding
    the output layer holds a zero copy (:func:`sync_tied_adapters` or a checkpoint fills it);
    on a stage without the output layer the embedding's factors are marked
    ``shared_embedding``, as megatron-core marks the embedding weight it shares with a later
    stage."""
    sites = {s.kind: s for s in iter_linear_sites(model) if s.kind in (OUTPUT_LAYER, EMBEDDING)}
    embedding = sites[EMBEDDING].module if EMBEDDING in sites else None
    if embedding is not None and adapter_name not in getattr(embedding, "lora_specs", {}):
        raise ValueError(f"cannot tie adapter {adapter_name!r} of the output layer: the embedding has none")
    if OUTPUT_LAYER not in sites:
        if embedding is not None:
            for factor in embedding.adapter_factors(adapter_name, embedding.lora_specs[adapter_name].segments[0]):
                factor.shared_embedding = True
        return
    site = sites[OUTPUT_LAYER]
    r = r or config.rank_alpha(hf_module_name(None, EMBED_TOKENS))[0]
    # PEFT scales the tied lm_head adapter by lm_head's own alpha / r.
    segment = Segment(name=LM_HEAD, r=r, scaling=config.scaling(LM_HEAD), width=_local_rows(site.module))
    spec = AdapterSpec((segment,), dropout=config.lora_dropout, init=config.init_lora_weights)
    names = (site.global_name, EMBEDDING_PATH, EMBED_TOKENS)
    add_lora_support(site.module).tie_adapter(adapter_name, spec, names, embedding, dtype)


def tied_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The factors of adapters tied across pipeline stages on this stage: the embedding's
    (first stage) or the output layer's copies (last stage), in the same order on both."""
    found = {}
    for _, layer in lora_layers(model):
        if isinstance(layer, LoraVocabParallelEmbedding):
            for name, spec in layer.lora_specs.items():
                a, b = layer.adapter_factors(name, spec.segments[0])
                if getattr(a, "shared_embedding", False):
                    found[(name, "A")], found[(name, "B")] = a, b
        for name, copy in getattr(layer, "lora_tied", {}).items():
            found[(name, "A")], found[(name, "B")] = copy["A"], copy["B"]
    return [found[k] for k in sorted(found)]


def _embedding_group():
    """megatron-core's embedding group (first and last pipeline stage) if this rank is in one
    of more than one rank, else None."""
    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    group = ps.get_embedding_group(check_initialized=False)
    if group is None or group.size() < 2 or dist.get_rank() not in dist.get_process_group_ranks(group):
        return None
    return group


@torch.no_grad()
def sync_tied_adapters(model: nn.Module) -> None:
    """Give the last stage's copies of tied adapters the first stage's values (zeros summed
    with them over the embedding group, as megatron-core starts its copy of the embedding).
    Call on every rank."""
    group = _embedding_group()
    if group is None:
        return
    params = tied_adapter_parameters(model)
    if not params:
        return
    flat = torch.cat([p.reshape(-1) for p in params])
    if not ps.is_pipeline_first_stage():
        flat.zero_()  # the first stage's values win, also for copies synchronised before
    dist.all_reduce(flat, group=group)
    for p, value in zip(params, flat.split([p.numel() for p in params])):
        p.copy_(value.view_as(p))


@torch.no_grad()
def allreduce_tied_adapter_grads(model: list[nn.Module]) -> None:
    """Sum the gradients of tied adapters over megatron-core's embedding group, as its
    ``finalize_model_grads`` sums the shared embedding weight's (``main_grad`` under its DDP,
    else ``grad``), so both stages' copies take the same step. Call on every rank after the
    backward passes, before the optimizer step."""
    group = _embedding_group()
    if group is None:  # PP = 1: nothing to sum (and no module walk on every step)
        return
    params = [p for chunk in model for p in tied_adapter_parameters(chunk) if p.requires_grad]
    if not params:
        return
    attr = "main_grad" if hasattr(params[0], "main_grad") else "grad"
    grads = [getattr(p, attr) if getattr(p, attr) is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for p, g, value in zip(params, grads, flat.split([g.numel() for g in grads])):
        g.copy_(value.view_as(g))
        setattr(p, attr, g)


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

    Works on any module tree of megatron-core parallel linears (a GPTModel, a stack of
    TransformerLayers, or plain ColumnParallelLinear / RowParallelLinear modules). Adapter
    weights are created in ``dtype`` (fp32 by default, also on a bf16/fp16 base). ``seed``: as
    in :func:`add_adapters`. Returns ``model``.
    """
    if add_adapters(model, config, adapter_name, dtype, seed) == 0:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of the model")
    return freeze_base(model)


def freeze_base(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the LoRA factors and DoRA magnitudes."""
    for _, param in model.named_parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters(), *layer.lora_magnitude_vector.parameters(),
                  *getattr(layer, "lora_tied", nn.Module()).parameters()]:
            p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module, adapters: Optional[Iterable[str]] = None) -> nn.Module:
    """Merge the active (or given) adapters into the TP-local base weights (every layer is
    checked first, so a refusal leaves the model unmerged)."""
    adapters = None if adapters is None else list(adapters)
    for _, layer in lora_layers(model):
        layer.check_merge(adapters)
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

    Whole-model counts add TP-split tensors over the TP group, expert tensors over the
    expert-parallel group (TP-split ones over expert TP x EP), and count replicated ones
    once (pipeline stages are not summed).
    """
    local = [0, 0]
    # (trainable, total) of the tensors each group splits: dense TP, expert TP x EP, EP.
    split = {"tp": [0, 0], "etp_ep": [0, 0], "ep": [0, 0]}
    for name, p in model.named_parameters():
        n = (p.numel() * p.requires_grad, p.numel())
        local = [a + b for a, b in zip(local, n)]
        tp_split = getattr(p, "tensor_model_parallel", False)
        group = ("etp_ep" if tp_split else "ep") if is_expert_parameter(name) else ("tp" if tp_split else None)
        if group is not None:
            split[group] = [a + b for a, b in zip(split[group], n)]
    from megatron.core import parallel_state

    # Only the split counts differ between ranks; the sums are device tensors (NCCL needs them).
    sums = {k: torch.tensor(v, dtype=torch.float64, device=device()) for k, v in split.items()}
    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        groups = {"tp": parallel_state.get_tensor_model_parallel_group(),
                  "etp_ep": parallel_state.get_expert_tensor_and_model_parallel_group(),
                  "ep": parallel_state.get_expert_model_parallel_group()}
        for k, t in sums.items():
            torch.distributed.all_reduce(t, group=groups[k])
    reduced = {k: [int(x) for x in t.tolist()] for k, t in sums.items()}
    total = [local[i] + sum(reduced[k][i] - split[k][i] for k in split) for i in range(2)]
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
