"""LoRA on megatron-core's ColumnParallelLinear and RowParallelLinear.

A LoRA layer *is* its base layer (a subclass: parameters, state-dict keys, attributes and
call signature unchanged) with adapters added. ``add_lora_support`` turns an existing
layer into one in place; the layer-spec classes build one directly.

Each adapter is a list of :class:`Segment` s. A segment owns one (A, B) pair, its scaling,
and the rows of the TP-local output it writes. A plain layer has one segment over all
rows; a fused layer (Megatron's ``linear_qkv`` or gated ``linear_fc1``) may carry one
segment per original projection. Rows are described generically: the local output is
viewed as ``[groups, period]`` and the segment writes ``[offset, offset + width)`` of every
period. Which rows those are for a given model is decided by the caller (``megatron_lora``).

Math: column layers hold A replicated and B split like W; row layers hold A split like W
and B replicated. The LoRA term joins the base layer's own collective, so no activation
collective is added. An expert of megatron-core's ``SequentialMLP`` is such a layer whose
``tp_group`` is the expert-TP group: its replicated factor sums its gradient over that group,
and under expert parallelism or expert TP the token dispatcher, not the layer, gathers the
input and reduces the output, for the LoRA term as for the base. The MoE router
(:class:`LoraTopKRouter`, ``parallel_mode`` "replicated") holds both factors whole on every
rank and marks them as megatron-core marks the router weight.

Precision, one rule (:class:`LoraComputeDtype`, the layer's ``lora_compute_dtype``):

- ``"base"`` (the default; training): the small factors are cast to the activations' dtype,
  the activations never are. A and B stay parameters in their own dtype (fp32 from
  ``apply_lora``) and their gradients reach them in it. On a bf16 base the LoRA GEMMs run in
  bf16 (tolerance against the fp32 math: ``tests/test_precision.py``).
- ``"fp32"`` (PEFT's rule, for ``convert --verify``, generation and equality checks):
  half-precision factors are upcast to fp32 and the activations cast to the factors' dtype;
  the LoRA term is added to the base output in that dtype and rounded once. Equal to
  HF + PEFT, whose default upcasts half-precision adapter weights to fp32.

On an fp32 base with fp32 or half-precision factors the two modes compute the same thing.

Sequence parallelism: a column layer's LoRA needs its gathered ``[tokens, in]`` input only
for A's gradient. By default it saves that gathered input (TP times the shard megatron keeps)
and adds no collective. With ``lora_sp_shard_input`` it keeps only this rank's
``[tokens / TP, in]`` shard and, in backward, reduce-scatters the rank-r term
``g B`` (``[tokens, sum r]``) instead: TP times less saved input for one extra collective of
``tokens x sum r`` elements per column layer and backward pass (about r / in of the base's
all-gather). The default keeps the package's rule of no activation collective beyond the
base's; memory-bound runs switch it on with ``configure_lora_layers``.

DoRA (PEFT's ``use_dora``): an adapter whose spec has ``dora`` carries a magnitude per output
row of each segment (``lora_magnitude_vector``, fp32 like the factors, split like B) and
rescales its rows to ``m / ||W + s B A||`` times the LoRA-adapted output, the norm taken per
row and detached (as PEFT does). A column layer holds whole rows, so the norm is local; a row
layer (and the embedding, whose norm runs over the split vocabulary) sums its squared partial
norms in one all-reduce of a vector of output rows per forward (and merge), independent of the
tokens. Its replicated magnitude and B sum their gradients in one collective, as B alone does
without DoRA, so backward adds none. The norm is computed in fp32. With LoRA dropout active the
base product is recomputed on the dropped-out input (PEFT's rule). DoRA runs outside the fused
autograd function (plain-LoRA layers keep it) and keeps the gathered input under sequence
parallelism (``lora_sp_shard_input`` does not apply).

X-LoRA and other mixtures plug in through ``extra_terms`` (see ``megatron_lora.parallel.xlora_mixing``).

An output layer tied to the embedding owns no weight (megatron-core passes the embedding's at
call time) and takes LoRA like any column layer; :meth:`LoraColumnParallelLinear.tie_adapter`
makes its adapter the embedding's transposed (PEFT's ``ensure_weight_tying``).

Layout: the adapter data and precision rule are in ``lora_spec``, the fused autograd function
and row helpers in ``lora_linear``, DoRA's math in ``dora`` (a mixin of :class:`LoraLayer`);
this module re-exports their public names.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, mappings
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from megatron_lora.parallel import collectives
from megatron_lora.parallel.device import device as default_device
from megatron_lora.parallel.dora import DoraMixin, _merged, _unmerged
from megatron_lora.parallel.lora_linear import _LinearWithLora, _flat, add_rows
from megatron_lora.parallel.lora_spec import (
    AdapterSpec,
    LoraComputeDtype,
    Segment,
    _initial_factors,
    compute_dtype,
    shard_rows,
    unshard_rows,
)

__all__ = [
    "AdapterSpec",
    "ExtraTerm",
    "LORA_CLASSES",
    "LoraColumnParallelLinear",
    "LoraComputeDtype",
    "LoraLayer",
    "LoraRowParallelLinear",
    "LoraTopKRouter",
    "LoraVocabParallelEmbedding",
    "Segment",
    "add_lora_support",
    "add_rows",
    "compute_dtype",
    "configure_lora_layers",
    "lora_class",
    "lora_layers",
    "shard_rows",
    "unshard_rows",
]


#: An extra term of a LoRA layer: ``term(layer, x2, out2) -> out2`` adds to the layer's
#: [tokens, out_local] output (in place or not) from its [tokens, in_local] input.
ExtraTerm = Callable[["LoraLayer", torch.Tensor, torch.Tensor], torch.Tensor]


class LoraLayer(DoraMixin):
    """Adapter bookkeeping and math shared by the column and row LoRA layers."""

    #: "column": A replicated, B split; "row": A split, B replicated; "replicated": both whole.
    parallel_mode: str

    def init_lora(self) -> None:
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        #: DoRA magnitudes: adapter -> segment -> [local rows] (split like B).
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.lora_disabled = False
        self.merged_adapters: list[str] = []
        self._merge_fixups: dict[str, list] = {}
        self.lora_compute_dtype = LoraComputeDtype.BASE
        self.lora_sp_shard_input = False
        #: Terms added after the active adapters' (X-LoRA's mixing of its experts); skipped
        #: while the adapters are disabled.
        self.extra_terms: list[ExtraTerm] = []

    # -- adapters ---------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        spec: AdapterSpec,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Add adapter ``name`` (active), its split factors slices of a full-shape init
        drawn from ``generator`` (None: the default RNG)."""
        if name in self.lora_specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        tp, world = self._tp_rank_world()
        dtype = dtype or torch.float32
        device = self.weight.device if self.weight is not None else default_device()
        a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
        for seg in spec.segments:
            self._check_segment(seg, world)
            a, b = self._initial_full_factors(seg, world, spec.init, dtype, generator)
            if self.parallel_mode == "column":
                b = shard_rows(b, seg.blocks, tp, world)
            elif self.parallel_mode == "row":
                a = a.chunk(world, 1)[tp]
            a_dict[seg.name] = nn.Parameter(a.to(device).contiguous())
            b_dict[seg.name] = nn.Parameter(b.to(device).contiguous())
            if self.parallel_mode != "replicated":
                split, dim = (b_dict, 0) if self.parallel_mode == "column" else (a_dict, 1)
                set_tensor_model_parallel_attributes(split[seg.name], True, dim, 1)
            # The marks megatron-core's gradient reduction reads off the weight: an expert's
            # allreduce=False (reduced over the expert data-parallel group) and, on a replicated
            # module (the router), sequence_parallel (summed over TP under sequence parallelism;
            # a split pair's replicated factor is summed in autograd instead).
            marks = ("allreduce", "sequence_parallel") if self.parallel_mode == "replicated" else ("allreduce",)
            for mark in marks:
                if hasattr(self.weight, mark):
                    for param in (a_dict[seg.name], b_dict[seg.name]):
                        setattr(param, mark, getattr(self.weight, mark))
        self.lora_A[name] = a_dict
        self.lora_B[name] = b_dict
        self.lora_specs[name] = spec
        if spec.dora:
            # PEFT's initial magnitude: the norm of the adapted weight, so the output starts at LoRA's.
            norms = self._weight_norms([name])
            m_dict = nn.ParameterDict({s.name: nn.Parameter(norms[(name, s.name)].to(dtype)) for s in spec.segments})
            for seg in spec.segments:
                if self.parallel_mode == "column":
                    set_tensor_model_parallel_attributes(m_dict[seg.name], True, 0, 1)
                if hasattr(self.weight, "allreduce"):
                    m_dict[seg.name].allreduce = self.weight.allreduce
            self.lora_magnitude_vector[name] = m_dict
        self.active_adapters.append(name)

    def _initial_full_factors(self, seg: Segment, world: int, init, dtype, generator):
        full_out = seg.local_rows * (world if self.parallel_mode == "column" else 1)
        return _initial_factors(seg, self.input_size, full_out, init, dtype, generator)

    def set_active_adapters(self, names: Iterable[str]) -> None:
        names = list(names)
        for n in names:
            if n not in self.lora_specs:
                raise ValueError(f"unknown adapter {n!r}; this layer has {sorted(self.lora_specs)}")
        self.active_adapters = names

    def _local_out(self) -> int:
        """Rows of the TP-local output (an output layer tied to the embedding owns no weight)."""
        return self.weight.shape[0] if self.weight is not None else self.output_size_per_partition

    def _check_segment(self, seg: Segment, world: int) -> None:
        out_local = self._local_out()
        period = seg.period or out_local
        if seg.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got r={seg.r} for segment {seg.name!r}")
        if seg.groups * period != out_local or seg.offset + seg.width > period:
            raise ValueError(
                f"segment {seg.name!r} (groups={seg.groups}, period={period}, offset={seg.offset}, "
                f"width={seg.width}) does not fit the local output of {out_local} rows"
            )
        if self.parallel_mode != "column" and (seg.groups != 1 or seg.width != out_local):
            raise ValueError(f"a {self.parallel_mode} LoRA segment must cover the whole output")

    def _tp_rank_world(self) -> tuple[int, int]:
        group = self.tp_group
        return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)

    # -- forward ------------------------------------------------------------------------
    def lora_input(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """``x`` after LoRA dropout ``p`` (in training)."""
        if not self.training or p == 0.0:
            return x
        if self.parallel_mode in ("column", "replicated"):
            # x is replicated: the default RNG draws the same mask on every TP rank.
            return F.dropout(x, p, True)
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, p, True)

    def adapter_factors(self, adapter: str, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one segment as stored (a tied adapter's are views of the embedding's)."""
        return self.lora_A[adapter][seg.name], self.lora_B[adapter][seg.name]

    def factors(self, adapter: str, seg: Segment, activation: torch.dtype, magnitude: bool = False) -> tuple[torch.Tensor, ...]:
        """(A, B) of one segment as the LoRA term uses them: replicated factors sum their
        gradient over TP (in the parameters' dtype), then both are cast to the compute dtype.
        With ``magnitude``, (A, B, m) of a DoRA segment, m in its own dtype; a row layer's
        replicated B and m sum their gradients in one collective."""
        a, b = self.adapter_factors(adapter, seg)
        extra = (self.lora_magnitude_vector[adapter][seg.name],) if magnitude else ()
        if self.parallel_mode == "column":
            a = collectives.replicated_factor(a, self.tp_group)
        elif self.parallel_mode == "row":
            b, *extra = collectives.replicated_factors((b, *extra), self.tp_group)
        dtype = compute_dtype(self.lora_compute_dtype, a.dtype, activation)
        return (a.to(dtype), b.to(dtype), *extra)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None, x_shard: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) with the LoRA and extra terms added, computed on [tokens, features].

        ``x_shard``: this rank's sequence-parallel rows of ``x`` (kept for backward instead of x).
        ``weight``: W given at call time (an output layer tied to the embedding), else ``self.weight``.
        """
        x2 = _flat(x)
        weight = self.weight if weight is None else weight
        if self.lora_disabled:
            out = F.linear(x2, weight, bias)
        else:
            out = self._lora_linear(x2, bias, None if x_shard is None else _flat(x_shard), weight)
            for term in self.extra_terms:
                out = term(self, x2, out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _lora_linear(self, x2: torch.Tensor, bias: torch.Tensor | None, x_shard: torch.Tensor | None,
                     weight: torch.Tensor) -> torch.Tensor:
        """x W^T (+ bias) + sum over active adapters and segments of s * (x A^T) B^T."""
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if any(self.lora_specs[n].dora for n in active):
            return self._dora_linear(x2, bias, active)
        segments, inputs, a_s, b_s = [], [], [], []
        for name in active:
            spec = self.lora_specs[name]
            xin = self.lora_input(x2, spec.dropout)
            for seg in spec.segments:
                a, b = self.factors(name, seg, x2.dtype)
                segments.append(seg), inputs.append(xin), a_s.append(a), b_s.append(b)
        if not segments:
            return F.linear(x2, weight, bias)
        group = self.tp_group if x_shard is not None else None
        return _LinearWithLora.apply(x2, x_shard, weight, bias, tuple(segments), group, *inputs, *a_s, *b_s)

    # -- merge --------------------------------------------------------------------------
    @torch.no_grad()
    def _delta_weight(self, adapter: str, seg: Segment) -> torch.Tensor:
        a, b = self.adapter_factors(adapter, seg)
        return (b.float() @ a.float()) * seg.scaling

    def _weight_rows(self, seg: Segment) -> torch.Tensor:
        w = self.weight
        period = seg.period or w.shape[0]
        return w.view(seg.groups, period, w.shape[1])[:, seg.offset : seg.offset + seg.width]

    def check_merge(self, adapters: Iterable[str] | None = None) -> None:
        """Raise ValueError if :meth:`merge` of ``adapters`` (None: the active ones) cannot run."""

    @torch.no_grad()
    def merge(self, adapters: Iterable[str] | None = None) -> None:
        """Add the adapters' deltas into the TP-local base weight.

        A DoRA adapter's rows become ``(m / n) (W + s B A)`` (PEFT's merge), ``n`` the norm of
        the unmerged base plus its delta: merging one onto already merged adapters first
        unmerges those (bit-exact) and merges them all again; a row layer sums its squared
        partial norms in one all-reduce. On an fp32 base the unmerge round trip is bit-exact:
        the few elements that do not round back to W are remembered and restored.
        """
        self.check_merge(adapters)
        names = [n for n in (adapters or self.active_adapters) if n not in self.merged_adapters]
        if any(self.lora_specs[n].dora for n in names) and self.merged_adapters:
            names = self.merged_adapters + names
            self.unmerge()
        norms = self._weight_norms(names)
        for name in names:
            if self.weight is None:  # a tied adapter: merged with the embedding's
                self._merge_fixups[name] = []
                self.merged_adapters.append(name)
                continue
            fixups = []
            for seg in self.lora_specs[name].segments:
                rows = self._weight_rows(seg)
                delta = self._delta_weight(name, seg).view(rows.shape)
                factor = None
                if (name, seg.name) in norms:
                    m = self.lora_magnitude_vector[name][seg.name].float()
                    factor = self._row_factor(seg, m / norms[(name, seg.name)])
                before = rows.clone() if rows.dtype == torch.float32 else None
                rows.copy_(_merged(rows.float(), delta, factor))
                if before is not None:
                    bad = _unmerged(rows, delta, factor) != before
                    fixups.append((factor, bad.nonzero(as_tuple=True), before[bad]))
                else:
                    fixups.append((factor, None, None))
            self._merge_fixups[name] = fixups
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, adapters: Iterable[str] | None = None) -> None:
        for name in list(adapters or self.merged_adapters)[::-1]:
            if name not in self.merged_adapters:
                continue
            fixups = self._merge_fixups.pop(name)
            if self.weight is None:  # a tied adapter, unmerged with the embedding
                self.merged_adapters.remove(name)
                continue
            for seg, (factor, index, values) in zip(self.lora_specs[name].segments, fixups):
                rows = self._weight_rows(seg)
                rows.copy_(_unmerged(rows.float(), self._delta_weight(name, seg).view(rows.shape), factor))
                if index is not None:
                    rows[index] = values
            self.merged_adapters.remove(name)

    # -- checkpointing ------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Base keys as megatron-core writes them; LoRA split factors sharded like W.

        A gated-unit B (``blocks == 2``) gets megatron-core's SwiGLU factory, as
        ``MLP.sharded_state_dict`` gives ``linear_fc1.weight``. Tensors split along the padded
        vocabulary allow a shape mismatch, as megatron-core's embedding and output layer do
        (the padding depends on the TP size).
        """
        split = "lora_B" if self.parallel_mode == "column" else "lora_A"
        axis = 0 if self.parallel_mode == "column" else 1
        axis_map = dict(self._base_axis_map)
        gated = []
        for name, spec in self.lora_specs.items():
            if name not in self.lora_A:
                continue  # a tied adapter (the embedding's parameters or their copy)
            for seg in spec.segments:
                if self.parallel_mode == "replicated":
                    continue
                # A column layer's magnitudes are split like its B (rows); a row layer's are replicated.
                parts = [split] + (["lora_magnitude_vector"] if spec.dora and self.parallel_mode == "column" else [])
                for part in parts:
                    axis_map[f"{part}.{name}.{seg.name}"] = axis
                    if seg.blocks == 2:
                        gated.append(f"{prefix}{part}.{name}.{seg.name}")
        axis_map.update(self._extra_axis_map())
        sd = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            axis_map,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )
        singleton = (metadata or {}).get("singleton_local_shards", False)
        for key in gated:
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton)
        for key in self._vocab_split_keys():
            sd[prefix + key].allow_shape_mismatch = True
        return sd

    def _extra_axis_map(self) -> dict[str, int]:
        """Split dims of state-dict entries other than the base's and the adapters' A and B."""
        return {}

    def _vocab_split_keys(self) -> list[str]:
        """State-dict keys of the tensors split along the padded vocabulary (none by default)."""
        return []


class LoraColumnParallelLinear(LoraLayer, ColumnParallelLinear):
    """ColumnParallelLinear with LoRA adapters: A replicated, B split like W."""

    parallel_mode = "column"
    _base_axis_map = {"weight": 0, "bias": 0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_lora()

    def init_lora(self) -> None:
        super().init_lora()
        #: Copies of tied adapters (see :meth:`tie_adapter`), in the embedding's layout.
        self.lora_tied = nn.ModuleDict()
        #: Adapter -> the embedding on this stage whose adapter it is tied to (not a submodule).
        self.lora_tied_embedding: dict[str, LoraVocabParallelEmbedding] = {}
        #: Adapter -> (this module's name, the embedding's name, its segment), for checkpoint keys.
        self.lora_tied_names: dict[str, tuple[str, str, str]] = {}

    def tie_adapter(self, name: str, spec: AdapterSpec, names: tuple[str, str, str],
                    embedding: "LoraVocabParallelEmbedding | None" = None, dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` tied to the word embedding's adapter ``name`` (PEFT's
        ``ensure_weight_tying``): A = E_B^T and B = E_A^T, so this output layer's W + s B A
        stays the transpose of the embedding's adapted weight; ``spec`` gives the scaling.

        ``embedding`` (on this pipeline stage): its parameters are used, so one gradient sums
        both uses. None (the output layer on a later stage than the embedding): this layer
        holds a copy in the embedding's layout, ``lora_tied[name]`` (``A`` [r, vocab / TP],
        ``B`` [hidden, r]), zero until synchronised, and marked ``shared_embedding`` as
        megatron-core marks its copy of the word embedding; its gradient is summed with the
        embedding's over the embedding group (``megatron_lora.model.lora``).
        ``names``: (this module's name, the embedding's name, its segment) in the model.
        """
        if name in self.lora_specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        (seg,) = spec.segments
        self._check_segment(seg, self._tp_rank_world()[1])
        if embedding is not None:
            self.lora_tied_embedding[name] = embedding
        else:
            device = self.weight.device if self.weight is not None else default_device()
            copy = nn.ParameterDict({
                "A": nn.Parameter(torch.zeros(seg.r, self._local_out(), dtype=dtype or torch.float32, device=device)),
                "B": nn.Parameter(torch.zeros(self.input_size, seg.r, dtype=dtype or torch.float32, device=device)),
            })
            set_tensor_model_parallel_attributes(copy["A"], True, 1, 1)
            for p in copy.values():
                p.shared_embedding = True
            self.lora_tied[name] = copy
        self.lora_tied_names[name] = names
        self.lora_specs[name] = spec
        self.active_adapters.append(name)

    def tied_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(E_A, E_B) in the embedding's layout of a tied adapter, else None."""
        if adapter in self.lora_tied:
            return self.lora_tied[adapter]["A"], self.lora_tied[adapter]["B"]
        embedding = self.lora_tied_embedding.get(adapter)
        if embedding is None:
            return None
        return embedding.adapter_factors(adapter, embedding.lora_specs[adapter].segments[0])

    def adapter_factors(self, adapter: str, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        tied = self.tied_factors(adapter)
        if tied is None:
            return super().adapter_factors(adapter, seg)
        return tied[1].t(), tied[0].t()

    def check_merge(self, adapters: Iterable[str] | None = None) -> None:
        # An output layer using the embedding's weight: only a tied adapter merges (with the
        # embedding's); any other would change the embedding too.
        if self.weight is not None:
            return
        for name in adapters or self.active_adapters:
            if name not in self.lora_tied_embedding:
                raise ValueError(
                    f"cannot merge adapter {name!r} into the output layer: its weight is the word embedding's "
                    "(tied), which the merge would change too; tie the adapters (ensure_weight_tying=True) or keep it unmerged"
                )

    def _extra_axis_map(self) -> dict[str, int]:
        return {f"lora_tied.{n}.A": 1 for n in self.lora_tied}  # the embedding's layout

    def _vocab_split_keys(self) -> list[str]:
        # The output layer of a GPT model: its rows are the (padded) vocabulary.
        if self.weight is not None and not getattr(self.weight, "is_embedding_or_output_parameter", False):
            return []
        keys = [f"lora_B.{n}.{s.name}" for n, spec in self.lora_specs.items() if n in self.lora_B for s in spec.segments]
        return keys + [f"lora_tied.{n}.A" for n in self.lora_tied]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """As :meth:`LoraLayer.sharded_state_dict`; a tied adapter's copy is saved as a replica of
        the embedding's adapter, as megatron-core saves the last stage's copy of the embedding."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for name in self.lora_tied:
            own, embedding, seg = self.lora_tied_names[name]
            parent = prefix[: len(prefix) - len(own) - 1] if prefix.endswith(own + ".") else prefix
            for part, factor in (("A", "lora_A"), ("B", "lora_B")):
                sharded = sd[f"{prefix}lora_tied.{name}.{part}"]
                sharded.key = f"{parent}{embedding}.{factor}.{name}.{seg}"
                sharded.replica_id = (1, *sharded.replica_id[1:])
        return sd

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None):
        if weight is None and self.weight is None:
            raise RuntimeError("the output layer owns no weight (tied to the embedding): pass weight=")
        if self.explicit_expert_comm:
            # An expert under expert parallelism or expert TP: the token dispatcher has
            # gathered its input and reduces the input gradient itself (as the base does).
            x = input_
        else:
            x = collectives.column_input(input_, self.sequence_parallel, self.tp_group)
        bias = self.bias if not self.skip_bias_add else None
        shard = (self.sequence_parallel and self.lora_sp_shard_input and self.tp_group.size() > 1
                 and not self.explicit_expert_comm)
        out = self._linear(x, bias, input_ if shard else None, weight)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        out = collectives.column_output(out, gather, self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)


class LoraRowParallelLinear(LoraLayer, RowParallelLinear):
    """RowParallelLinear with LoRA adapters: A split like W, B replicated."""

    parallel_mode = "row"
    _base_axis_map = {"weight": 1}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_lora()

    def forward(self, input_: torch.Tensor):
        x = collectives.row_input(input_, self.input_is_parallel, self.tp_group)
        partial = self._linear(x, None)
        if self.explicit_expert_comm:
            # An expert: the token dispatcher's combine reduces the base + LoRA partials.
            out = partial
        else:
            out = collectives.row_output(partial, self.sequence_parallel, self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return out, (self.bias if self.skip_bias_add else None)
        return out + self.bias, None


class LoraVocabParallelEmbedding(LoraLayer, VocabParallelEmbedding):
    """VocabParallelEmbedding with PEFT's embedding LoRA: y = W[ids] + s (A^T[ids]) B^T.

    A [r, vocab] is split like the vocabulary (``parallel_mode`` "row": A split along dim 1,
    B [hidden, r] replicated). Each rank looks up its vocabulary slice of A^T, so its LoRA
    term, like its base rows, is zero for ids outside the slice: the term joins the
    embedding's own reduction. No dropout (PEFT applies none to embeddings). A segment's
    ``width`` is the local vocabulary (the weight's rows, which merging updates).
    """

    parallel_mode = "row"
    _base_axis_map = {"weight": 0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_lora()

    def init_lora(self) -> None:
        super().init_lora()
        #: The vocabulary without TP padding (None: every row is real): DoRA's norm over the
        #: vocabulary leaves the padding rows out, as the unpadded model has none.
        self.lora_vocab_size: int | None = None

    def _vocab_split_keys(self) -> list[str]:
        return ["weight"] + [f"lora_A.{n}.{s.name}" for n, spec in self.lora_specs.items() for s in spec.segments]

    def _initial_full_factors(self, seg: Segment, world: int, init, dtype, generator):
        # PEFT: A zeros and B normal(0, 1) unless init_lora_weights=False (both standard normal).
        vocab, hidden = seg.local_rows * world, self.embedding_dim
        b = torch.empty(hidden, seg.r, dtype=dtype).normal_(generator=generator)
        if init is False:
            return torch.empty(seg.r, vocab, dtype=dtype).normal_(generator=generator), b
        if init not in (True, "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} is not supported (True, False, 'gaussian')")
        return torch.zeros(seg.r, vocab, dtype=dtype), b

    @torch.no_grad()
    def _delta_weight(self, adapter: str, seg: Segment) -> torch.Tensor:
        a, b = self.adapter_factors(adapter, seg)
        return (b.float() @ a.float()).t() * seg.scaling

    def _squared_norms(self, adapter: str, seg: Segment) -> torch.Tensor:
        """PEFT's embedding DoRA norm runs over the vocabulary, per hidden unit: this rank's
        part of it (real vocabulary rows only)."""
        w = self.weight.float() + self._delta_weight(adapter, seg)
        if self.lora_vocab_size is not None:
            w = w[: max(0, min(w.shape[0], self.lora_vocab_size - self.vocab_start_index))]
        return w.square().sum(0)

    def _row_factor(self, seg: Segment, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, 1, -1)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        split = self.tp_group.size() > 1
        ids = input_
        if split:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(ids, self.weight)
        if not self.lora_disabled:
            active = [n for n in self.active_adapters if n not in self.merged_adapters]
            norms = self._weight_norms(active)
            for name in active:
                for seg in self.lora_specs[name].segments:
                    if not self.lora_specs[name].dora:
                        a, b = self.factors(name, seg, out.dtype)
                        out = out + (F.embedding(ids, a.t()) @ b.t()) * seg.scaling
                        continue
                    # PEFT: (m / n) (running output + s A^T[ids] B^T), n over the vocabulary.
                    a, b, m = self.factors(name, seg, out.dtype, magnitude=True)
                    ratio = (m.float() / norms[(name, seg.name)]).to(a.dtype)
                    out = ratio * (out + (F.embedding(ids, a.t()) @ b.t()) * seg.scaling)
        if split:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return mappings.reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(), group=self.tp_group)
        return mappings.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


class LoraTopKRouter(TopKRouter, LoraLayer):
    """megatron-core's MoE router with LoRA on its gating linear, as PEFT's
    ``target_parameters=["gate.weight"]`` adapts HF's router:
    logits = x W^T + s (x A^T) B^T, A [r, hidden], B [experts, r].

    The router is replicated over TP, and so are both factors (``parallel_mode``
    "replicated"): its tokens are all of this rank's, so the factors' gradients are complete
    except under sequence parallelism, where they are marked ``sequence_parallel`` as the
    router weight is and megatron-core's ``finalize_model_grads`` sums them over TP with it.
    The LoRA term is added to the logits in the router's dtype (``moe_router_dtype``, fp32 on
    a half-precision base when set), following ``lora_compute_dtype`` against it.
    """

    parallel_mode = "replicated"
    _base_axis_map: dict = {}
    # LoraLayer comes after TopKRouter among the bases (with it first, ``add_lora_support``
    # could not reassign a TopKRouter's ``__class__``: its abc.ABC base changes the layout),
    # so the one method both define is picked here.
    sharded_state_dict = LoraLayer.sharded_state_dict

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_lora()

    @property
    def input_size(self) -> int:
        return self.config.hidden_size

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        if self.lora_disabled:
            return logits
        x2, out = _flat(input), _flat(logits)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            spec = self.lora_specs[name]
            xin = self.lora_input(x2, spec.dropout)
            for seg in spec.segments:
                a, b = self.factors(name, seg, out.dtype)
                term = F.linear(F.linear(xin.to(a.dtype), a), b) * seg.scaling
                # A wider term is added in its dtype and rounded once, as in add_rows.
                out = (out.to(term.dtype) + term).to(logits.dtype)
        return out.view_as(logits)


LORA_CLASSES: dict[type, type] = {
    ColumnParallelLinear: LoraColumnParallelLinear,
    RowParallelLinear: LoraRowParallelLinear,
    VocabParallelEmbedding: LoraVocabParallelEmbedding,
    TopKRouter: LoraTopKRouter,
}


def lora_class(cls: type) -> type:
    """The LoRA class of a ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding /
    TopKRouter class or subclass.

    A subclass gets a LoRA subclass of its own (made once), so ``isinstance`` checks on the
    original class keep holding; the LoRA forward replaces the base class's.
    """
    if issubclass(cls, LoraLayer):
        return cls
    if cls not in LORA_CLASSES:
        base = next((b for b in (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, TopKRouter)
                     if issubclass(cls, b)), None)
        if base is None:
            raise TypeError(
                f"cannot add LoRA to {cls.__module__}.{cls.__qualname__}: supported classes are "
                "ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding and TopKRouter (and their subclasses)"
            )
        lora = LORA_CLASSES[base]
        LORA_CLASSES[cls] = type(f"Lora{cls.__name__}", (lora, cls), {"__module__": __name__})
    return LORA_CLASSES[cls]


def add_lora_support(module: nn.Module) -> LoraLayer:
    """Turn a ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding / TopKRouter (or
    subclass) into its LoRA class, in place.

    Parameters, buffers, hooks and state-dict keys stay as they are; the instance only
    gains the adapter containers. Any other class is refused by name.
    """
    cls = lora_class(type(module))
    if type(module) is not cls:
        module.__class__ = cls
        module.init_lora()
    return module


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def configure_lora_layers(
    model: nn.Module,
    compute_dtype: LoraComputeDtype | str | None = None,
    sp_shard_input: bool | None = None,
) -> nn.Module:
    """Set every LoRA layer's precision mode and sequence-parallel input saving (None: keep)."""
    mode = None if compute_dtype is None else LoraComputeDtype(compute_dtype)
    for _, layer in lora_layers(model):
        if mode is not None:
            layer.lora_compute_dtype = mode
        if sp_shard_input is not None:
            layer.lora_sp_shard_input = sp_shard_input
    return model
