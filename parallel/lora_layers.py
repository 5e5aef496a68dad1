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

X-LoRA and other mixtures plug in through ``extra_terms`` (see ``megatron_lora.parallel.xlora_mixing``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

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


@dataclass(frozen=True)
class Segment:
    """One LoRA (A, B) pair and the TP-local output rows it writes.

    ``width`` rows at ``offset`` in each of ``groups`` periods of ``period`` rows (B has
    ``groups * width`` local rows, group-major). ``blocks`` is how the full (TP=1) B splits
    over ranks: 1 = contiguous row chunks; 2 = a ``[gate; up]`` B whose halves are each
    chunked (rank j holds ``[gate_j; up_j]``, megatron-core's gated-unit layout).
    """

    name: str
    r: int
    scaling: float
    width: int
    groups: int = 1
    period: int = 0
    offset: int = 0
    blocks: int = 1

    @property
    def local_rows(self) -> int:
        return self.groups * self.width


@dataclass(frozen=True)
class AdapterSpec:
    """Options of one named adapter on one layer (PEFT's semantics)."""

    segments: tuple[Segment, ...]
    dropout: float = 0.0
    init: bool | str = True  # True: A kaiming-uniform, B zero; "gaussian"; False: both random


def shard_rows(full: torch.Tensor, blocks: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a full tensor split over TP (``blocks`` as in :class:`Segment`)."""
    return torch.cat([b.chunk(world, 0)[rank] for b in full.chunk(blocks, 0)], 0)


def unshard_rows(shards: Sequence[torch.Tensor], blocks: int) -> torch.Tensor:
    """Inverse of :func:`shard_rows` over all ranks' shards."""
    parts = [s.chunk(blocks, 0) for s in shards]
    return torch.cat([p[b] for b in range(blocks) for p in parts], 0)


class LoraComputeDtype(str, enum.Enum):
    """The dtype LoRA's small GEMMs run in (see the module docstring)."""

    #: PEFT's rule: half-precision factors upcast to fp32, activations cast to the factors.
    FP32 = "fp32"
    #: The base's rule: factors cast to the activations' dtype.
    BASE = "base"


def compute_dtype(mode: LoraComputeDtype, factor: torch.dtype, activation: torch.dtype) -> torch.dtype:
    """The dtype of the LoRA term for factors of dtype ``factor`` on activations of ``activation``."""
    if mode == LoraComputeDtype.BASE:
        return activation
    return torch.float32 if factor in (torch.float16, torch.bfloat16) else factor


def _kaiming_uniform(rows: int, fan_in: int, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    # nn.Linear's default (kaiming_uniform with a=sqrt(5)): bound = 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rows, fan_in, dtype=dtype).uniform_(-bound, bound, generator=generator)


def _initial_factors(seg: Segment, full_in: int, full_out: int, init: bool | str, dtype, generator=None):
    """Full-shape (TP=1) A [r, in] and B [out, r], drawn on the CPU from ``generator`` (None:
    the default RNG, as PEFT does), so every TP layout and device starts from the same values."""
    if init == "gaussian":
        a = torch.empty(seg.r, full_in, dtype=dtype).normal_(0.0, 1.0 / seg.r, generator=generator)
    elif init is True or init is False:
        a = _kaiming_uniform(seg.r, full_in, dtype, generator)
    else:
        raise ValueError(f"init_lora_weights={init!r} is not supported (True, False, 'gaussian')")
    if init is False:
        b = _kaiming_uniform(full_out, seg.r, dtype, generator)
    else:
        b = torch.zeros(full_out, seg.r, dtype=dtype)
    return a, b


#: An extra term of a LoRA layer: ``term(layer, x2, out2) -> out2`` adds to the layer's
#: [tokens, out_local] output (in place or not) from its [tokens, in_local] input.
ExtraTerm = Callable[["LoraLayer", torch.Tensor, torch.Tensor], torch.Tensor]


class LoraLayer:
    """Adapter bookkeeping and math shared by the column and row LoRA layers."""

    #: "column": A replicated, B split; "row": A split, B replicated; "replicated": both whole.
    parallel_mode: str

    def init_lora(self) -> None:
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
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
        device = self.weight.device
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

    def _check_segment(self, seg: Segment, world: int) -> None:
        out_local = self.weight.shape[0]
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

    def factors(self, adapter: str, seg: Segment, activation: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one segment as the LoRA term uses them: the replicated factor of a split
        pair sums its gradient over TP (in the parameters' dtype), then both are cast to the
        compute dtype."""
        a, b = self.lora_A[adapter][seg.name], self.lora_B[adapter][seg.name]
        if self.parallel_mode == "column":
            a = collectives.replicated_factor(a, self.tp_group)
        elif self.parallel_mode == "row":
            b = collectives.replicated_factor(b, self.tp_group)
        dtype = compute_dtype(self.lora_compute_dtype, a.dtype, activation)
        return a.to(dtype), b.to(dtype)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None, x_shard: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) with the LoRA and extra terms added, computed on [tokens, features].

        ``x_shard``: this rank's sequence-parallel rows of ``x`` (kept for backward instead of x).
        """
        x2 = _flat(x)
        if self.lora_disabled:
            out = F.linear(x2, self.weight, bias)
        else:
            out = self._lora_linear(x2, bias, None if x_shard is None else _flat(x_shard))
            for term in self.extra_terms:
                out = term(self, x2, out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _lora_linear(self, x2: torch.Tensor, bias: torch.Tensor | None, x_shard: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias) + sum over active adapters and segments of s * (x A^T) B^T."""
        segments, inputs, a_s, b_s = [], [], [], []
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            spec = self.lora_specs[name]
            xin = self.lora_input(x2, spec.dropout)
            for seg in spec.segments:
                a, b = self.factors(name, seg, x2.dtype)
                segments.append(seg), inputs.append(xin), a_s.append(a), b_s.append(b)
        if not segments:
            return F.linear(x2, self.weight, bias)
        group = self.tp_group if x_shard is not None else None
        return _LinearWithLora.apply(x2, x_shard, self.weight, bias, tuple(segments), group, *inputs, *a_s, *b_s)

    # -- merge --------------------------------------------------------------------------
    @torch.no_grad()
    def _delta_weight(self, adapter: str, seg: Segment) -> torch.Tensor:
        a, b = self.lora_A[adapter][seg.name], self.lora_B[adapter][seg.name]
        return (b.float() @ a.float()) * seg.scaling

    def _weight_rows(self, seg: Segment) -> torch.Tensor:
        w = self.weight
        period = seg.period or w.shape[0]
        return w.view(seg.groups, period, w.shape[1])[:, seg.offset : seg.offset + seg.width]

    @torch.no_grad()
    def merge(self, adapters: Iterable[str] | None = None) -> None:
        """Add the adapters' deltas into the TP-local base weight (no communication).

        On an fp32 base the unmerge round trip is bit-exact: the few elements where
        ``(W + d) - d`` does not round back to W are remembered and restored.
        """
        for name in list(adapters or self.active_adapters):
            if name in self.merged_adapters:
                continue
            fixups = []
            for seg in self.lora_specs[name].segments:
                rows = self._weight_rows(seg)
                delta = self._delta_weight(name, seg).view(rows.shape)
                before = rows.clone() if rows.dtype == torch.float32 else None
                rows.add_(delta.to(rows.dtype))
                if before is not None:
                    bad = (rows - delta) != before
                    fixups.append((bad.nonzero(as_tuple=True), before[bad]))
            self._merge_fixups[name] = fixups
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, adapters: Iterable[str] | None = None) -> None:
        for name in list(adapters or self.merged_adapters)[::-1]:
            if name not in self.merged_adapters:
                continue
            fixups = self._merge_fixups.pop(name)
            for i, seg in enumerate(self.lora_specs[name].segments):
                rows = self._weight_rows(seg)
                rows.sub_(self._delta_weight(name, seg).view(rows.shape).to(rows.dtype))
                if fixups:
                    index, values = fixups[i]
                    rows[index] = values
            self.merged_adapters.remove(name)

    # -- checkpointing ------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Base keys as megatron-core writes them; LoRA split factors sharded like W.

        A gated-unit B (``blocks == 2``) gets megatron-core's SwiGLU factory, as
        ``MLP.sharded_state_dict`` gives ``linear_fc1.weight``.
        """
        split = "lora_B" if self.parallel_mode == "column" else "lora_A"
        axis = 0 if self.parallel_mode == "column" else 1
        axis_map = dict(self._base_axis_map)
        gated = []
        for name, spec in self.lora_specs.items():
            for seg in spec.segments:
                if self.parallel_mode == "replicated":
                    continue
                axis_map[f"{split}.{name}.{seg.name}"] = axis
                if seg.blocks == 2:
                    gated.append(f"{prefix}{split}.{name}.{seg.name}")
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
        return sd


class _LinearWithLora(torch.autograd.Function):
    """y = x W^T (+ bias) + sum_k s_k (x_k A_k^T) B_k^T into segment k's rows, as one node.

    ``x_k`` is ``x`` itself, or its dropped-out copy when LoRA dropout is active. Same
    forward ops as the plain composition; one autograd node saves, for each term whose input
    is ``x``, a separate [tokens, in] input-gradient sum (its ``gh A`` is added into the
    base's ``g W`` with addmm_), and writes into output rows without autograd view copies.

    ``x_shard`` (sequence parallelism, else None): this rank's rows of ``x``; then only the
    rows of this rank of every input are saved, the ``gh`` terms are reduce-scattered over
    ``group`` for A's gradients, and ``x`` is re-gathered only if W needs a gradient.
    Arguments after ``group``: the n inputs x_k, the n A's, the n B's.
    """

    @staticmethod
    def forward(ctx, x, x_shard, weight, bias, segments, group, *tensors):
        n = len(segments)
        inputs, a_s, b_s = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        out = F.linear(x, weight, bias)
        hs = []
        for seg, xin, a, b in zip(segments, inputs, a_s, b_s):
            hs.append(F.linear(xin.to(a.dtype), a))
            add_rows(out, seg, hs[-1], b)
        ctx.segments = segments
        ctx.has_bias = bias is not None
        ctx.input_is_x = [xin is x for xin in inputs]
        ctx.group = group
        if x_shard is not None:
            rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
            # A copy, so the gathered dropped-out input is not kept alive by a view.
            inputs = [x_shard if is_x else xin.chunk(world, 0)[rank].clone() for xin, is_x in zip(inputs, ctx.input_is_x)]
            x = x_shard
        ctx.save_for_backward(x, weight, *inputs, *a_s, *b_s, *hs)
        return out

    @staticmethod
    def backward(ctx, g):
        n = len(ctx.segments)
        x, weight, *rest = ctx.saved_tensors
        inputs, a_s, b_s, hs = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n], rest[3 * n :]
        need = ctx.needs_input_grad[6:]  # of inputs, A's, B's
        sharded = ctx.group is not None
        grad_x = g.mm(weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = g.t().mm(collectives.all_gather_rows(x, ctx.group) if sharded else x)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        grad_in, grad_a, grad_b = [None] * n, [None] * n, [None] * n
        ghs = []
        for k, (seg, b, h) in enumerate(zip(ctx.segments, b_s, hs)):
            gs = _rows(g, seg).to(b.dtype)  # gradient of this term's output rows
            ghs.append(gs.mm(b).mul_(seg.scaling))  # gradient of h = x_k A^T
            if need[2 * n + k]:
                grad_b[k] = gs.t().mm(h).mul_(seg.scaling)
        # A's gradient: gh^T x_k. gh is a partial sum over TP; under sequence parallelism the
        # reduce-scatter completes this rank's rows, and A's TP gradient sum adds the rows up.
        gh_rows = ghs
        if sharded and any(need[n : 2 * n]):
            ranks = [gh.shape[1] for gh in ghs]
            gh_rows = collectives.reduce_scatter_rows(torch.cat(ghs, 1), ctx.group).split(ranks, 1)
        for k, (xin, a, gh) in enumerate(zip(inputs, a_s, ghs)):
            if need[n + k]:
                grad_a[k] = gh_rows[k].t().to(a.dtype).mm(xin.to(a.dtype))
            if ctx.input_is_x[k]:
                if grad_x is not None and grad_x.dtype == gh.dtype:
                    grad_x.addmm_(gh, a)
                elif grad_x is not None:
                    grad_x.add_(gh.mm(a).to(grad_x.dtype))
            elif need[k]:
                grad_in[k] = gh.mm(a).to(xin.dtype)
        return (grad_x, None, grad_w, grad_bias, None, None, *grad_in, *grad_a, *grad_b)


def _rows(t: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The columns of ``t`` [tokens, out_local] that ``seg`` writes, as [tokens, local_rows]."""
    if seg.groups == 1 and seg.width == t.shape[1]:
        return t
    period = seg.period or t.shape[1]
    return t.view(t.shape[0], seg.groups, period)[:, :, seg.offset : seg.offset + seg.width].reshape(t.shape[0], -1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [tokens, features]; a 2-D tensor is returned as is, not as a view of itself,
    so the in-place LoRA update of a base output costs autograd no copies (CopySlices)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def add_rows(out2: torch.Tensor, seg: Segment, h: torch.Tensor, b: torch.Tensor) -> None:
    """out2[:, rows of seg] += scaling * h @ b^T, in place (out2 is [tokens, out_local]).

    A term in another dtype than the output is added in the wider dtype and rounded once,
    as PEFT adds an fp32 LoRA term to a half-precision base output.
    """
    whole = seg.groups == 1 and seg.width == out2.shape[1]
    if whole and out2.dtype == h.dtype:
        out2.addmm_(h, b.t(), alpha=seg.scaling)
        return
    delta = F.linear(h, b)
    if whole:
        rows = out2
    else:
        period = seg.period or out2.shape[1]
        rows = out2.view(out2.shape[0], seg.groups, period)[:, :, seg.offset : seg.offset + seg.width]
        delta = delta.view(rows.shape)
    if delta.dtype == out2.dtype:
        rows.add_(delta, alpha=seg.scaling)
    else:
        rows.copy_(torch.add(rows, delta, alpha=seg.scaling))


class LoraColumnParallelLinear(LoraLayer, ColumnParallelLinear):
    """ColumnParallelLinear with LoRA adapters: A replicated, B split like W."""

    parallel_mode = "column"
    _base_axis_map = {"weight": 0, "bias": 0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_lora()

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None):
        if weight is not None:
            raise NotImplementedError("LoRA on a column layer with an external weight")
        if self.explicit_expert_comm:
            # An expert under expert parallelism or expert TP: the token dispatcher has
            # gathered its input and reduces the input gradient itself (as the base does).
            x = input_
        else:
            x = collectives.column_input(input_, self.sequence_parallel, self.tp_group)
        bias = self.bias if not self.skip_bias_add else None
        shard = (self.sequence_parallel and self.lora_sp_shard_input and self.tp_group.size() > 1
                 and not self.explicit_expert_comm)
        out = self._linear(x, bias, input_ if shard else None)
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
        a, b = self.lora_A[adapter][seg.name], self.lora_B[adapter][seg.name]
        return (b.float() @ a.float()).t() * seg.scaling

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        split = self.tp_group.size() > 1
        ids = input_
        if split:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(ids, self.weight)
        if not self.lora_disabled:
            for name in self.active_adapters:
                if name in self.merged_adapters:
                    continue
                for seg in self.lora_specs[name].segments:
                    a, b = self.factors(name, seg, out.dtype)
                    out = out + (F.embedding(ids, a.t()) @ b.t()) * seg.scaling
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
