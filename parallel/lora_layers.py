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

Math (DESIGN 2): column layers hold A replicated and B split like W; row layers hold A
split like W and B replicated. The LoRA term joins the base layer's own collective, so no
activation collective is added.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
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


def _kaiming_uniform(rows: int, fan_in: int, dtype: torch.dtype) -> torch.Tensor:
    # nn.Linear's default (kaiming_uniform with a=sqrt(5)): bound = 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rows, fan_in, dtype=dtype).uniform_(-bound, bound)


def _initial_factors(seg: Segment, full_in: int, full_out: int, init: bool | str, dtype):
    """Full-shape (TP=1) A [r, in] and B [out, r], drawn from the default RNG as PEFT does."""
    if init == "gaussian":
        a = torch.empty(seg.r, full_in, dtype=dtype).normal_(0.0, 1.0 / seg.r)
    elif init is True or init is False:
        a = _kaiming_uniform(seg.r, full_in, dtype)
    else:
        raise ValueError(f"init_lora_weights={init!r} is not supported (True, False, 'gaussian')")
    b = _kaiming_uniform(full_out, seg.r, dtype) if init is False else torch.zeros(full_out, seg.r, dtype=dtype)
    return a, b


class _LoraMixin:
    """Adapter bookkeeping and math shared by the column and row LoRA layers."""

    #: "column": A replicated, B split; "row": A split, B replicated.
    parallel_mode: str

    def init_lora(self) -> None:
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.lora_disabled = False
        self.merged_adapters: list[str] = []
        self._merge_fixups: dict[str, list] = {}
        #: X-LoRA: an object with ``experts`` (adapter names, expert order) and
        #: ``for_layer(index)`` -> per-token scalings [tokens, n_experts] (None when all are
        #: zero, so the experts are skipped); None for plain LoRA.
        self.xlora_source = None
        #: X-LoRA layer index of each segment name (each fused segment has its own).
        self.xlora_layer_index: dict[str, int] = {}

    # -- adapters ---------------------------------------------------------------------
    def add_adapter(self, name: str, spec: AdapterSpec, dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` (active), its split factors slices of a full-shape init."""
        if name in self.lora_specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        tp, world = self._tp_rank_world()
        dtype = dtype or torch.float32
        device = self.weight.device
        a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
        for seg in spec.segments:
            self._check_segment(seg, world)
            full_in = self.input_size
            full_out = seg.local_rows * (world if self.parallel_mode == "column" else 1)
            a, b = _initial_factors(seg, full_in, full_out, spec.init, dtype)
            if self.parallel_mode == "column":
                b = shard_rows(b, seg.blocks, tp, world)
            else:
                a = a.chunk(world, 1)[tp]
            a_dict[seg.name] = nn.Parameter(a.to(device).contiguous())
            b_dict[seg.name] = nn.Parameter(b.to(device).contiguous())
            split, dim = (b_dict, 0) if self.parallel_mode == "column" else (a_dict, 1)
            set_tensor_model_parallel_attributes(split[seg.name], True, dim, 1)
        self.lora_A[name] = a_dict
        self.lora_B[name] = b_dict
        self.lora_specs[name] = spec
        self.active_adapters.append(name)

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
        if self.parallel_mode == "row" and (seg.groups != 1 or seg.width != out_local):
            raise ValueError("a row-parallel LoRA segment must cover the whole output")

    def _tp_rank_world(self) -> tuple[int, int]:
        group = self.tp_group
        return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)

    # -- forward ------------------------------------------------------------------------
    def _lora_input(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if not self.training or p == 0.0:
            return x
        if self.parallel_mode == "column":
            # x is replicated: the default RNG draws the same mask on every TP rank.
            return F.dropout(x, p, True)
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, p, True)

    def _factors(self, adapter: str, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A[adapter][seg.name], self.lora_B[adapter][seg.name]
        if self.parallel_mode == "column":
            return collectives.replicated_factor(a, self.tp_group), b
        return a, collectives.replicated_factor(b, self.tp_group)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias) with the LoRA terms added, computed on [tokens, features]."""
        x2 = _flat(x)
        if self.lora_disabled:
            out = F.linear(x2, self.weight, bias)
        elif self.xlora_source is not None:
            out = self._add_xlora(F.linear(x2, self.weight, bias), x2)
        else:
            out = self._lora_linear(x2, bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _lora_linear(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias) + sum over active adapters and segments of s * (x A^T) B^T."""
        segments, inputs, a_s, b_s = [], [], [], []
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            spec = self.lora_specs[name]
            xin = self._lora_input(x2, spec.dropout)
            for seg in spec.segments:
                a, b = self._factors(name, seg)
                segments.append(seg), inputs.append(xin), a_s.append(a), b_s.append(b)
        if not segments:
            return F.linear(x2, self.weight, bias)
        return _LinearWithLora.apply(x2, self.weight, bias, tuple(segments), *inputs, *a_s, *b_s)

    def _add_xlora(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out += sum_i s_i S_i(token, layer) (x A_i^T) B_i^T per segment (DESIGN 5).

        Without active dropout the experts of a segment are stacked: one GEMM with the
        [sum r, in] stacked A, per-token scaling of each expert's r columns, one GEMM with
        the [out, sum r] stacked B. With active dropout each expert draws its own mask.
        """
        if self.merged_adapters:
            raise ValueError("X-LoRA cannot run with merged adapters: call unmerge_lora first")
        source = self.xlora_source
        out2, x2 = _flat(out), _flat(x)
        for seg_name, index in self.xlora_layer_index.items():
            experts = [
                (i, name, seg)
                for i, name in enumerate(source.experts)
                if name in self.lora_specs
                for seg in self.lora_specs[name].segments
                if seg.name == seg_name
            ]
            if not experts:
                continue
            scalings = source.for_layer(index)  # [tokens, n_experts], None: all zero
            if scalings is None:
                continue
            seg0 = dataclasses.replace(experts[0][2], scaling=1.0)
            factors = [self._factors(name, seg) for _, name, seg in experts]
            coef = [scalings[:, i : i + 1] * seg.scaling for i, _, seg in experts]
            dropouts = [self.lora_specs[name].dropout for _, name, _ in experts]
            if self.training and any(p > 0.0 for p in dropouts):
                for (a, b), c, p in zip(factors, coef, dropouts):
                    h = F.linear(self._lora_input(x2, p).to(a.dtype), a) * c.to(a.dtype)
                    _add_rows(out2, seg0, h, b)
                continue
            a = torch.cat([a for a, _ in factors], 0)
            b = torch.cat([b for _, b in factors], 1)
            ranks = torch.tensor([f[0].shape[0] for f in factors], device=x2.device)
            h = F.linear(x2.to(a.dtype), a) * torch.cat(coef, 1).to(a.dtype).repeat_interleave(ranks, 1)
            _add_rows(out2, seg0, h, b)
        return out2.view(out.shape)

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
                axis_map[f"{split}.{name}.{seg.name}"] = axis
                if seg.blocks == 2:
                    gated.append(f"{prefix}{split}.{name}.{seg.name}")
        sd = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            axis_map,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
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
    Arguments after ``segments``: the n inputs x_k, the n A's, the n B's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, segments, *tensors):
        n = len(segments)
        inputs, a_s, b_s = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        out = F.linear(x, weight, bias)
        hs = []
        for seg, xin, a, b in zip(segments, inputs, a_s, b_s):
            hs.append(F.linear(xin.to(a.dtype), a))
            _add_rows(out, seg, hs[-1], b)
        ctx.segments = segments
        ctx.has_bias = bias is not None
        ctx.input_is_x = [xin is x for xin in inputs]
        ctx.save_for_backward(x, weight, *inputs, *a_s, *b_s, *hs)
        return out

    @staticmethod
    def backward(ctx, g):
        n = len(ctx.segments)
        x, weight, *rest = ctx.saved_tensors
        inputs, a_s, b_s, hs = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n], rest[3 * n :]
        need = ctx.needs_input_grad[4:]  # of inputs, A's, B's
        grad_x = g.mm(weight) if ctx.needs_input_grad[0] else None
        grad_w = g.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_in, grad_a, grad_b = [None] * n, [None] * n, [None] * n
        for k, (seg, xin, a, b, h) in enumerate(zip(ctx.segments, inputs, a_s, b_s, hs)):
            gs = _rows(g, seg).to(b.dtype)  # gradient of this term's output rows
            gh = gs.mm(b).mul_(seg.scaling)  # gradient of h = x_k A^T
            if need[2 * n + k]:
                grad_b[k] = gs.t().mm(h).mul_(seg.scaling)
            if need[n + k]:
                grad_a[k] = gh.t().mm(xin.to(a.dtype))
            if ctx.input_is_x[k]:
                if grad_x is not None and grad_x.dtype == gh.dtype:
                    grad_x.addmm_(gh, a)
                elif grad_x is not None:
                    grad_x.add_(gh.mm(a).to(grad_x.dtype))
            elif need[k]:
                grad_in[k] = gh.mm(a).to(xin.dtype)
        return (grad_x, grad_w, grad_bias, None, *grad_in, *grad_a, *grad_b)


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


def _add_rows(out2: torch.Tensor, seg: Segment, h: torch.Tensor, b: torch.Tensor) -> None:
    """out2[:, rows of seg] += scaling * h @ b^T, in place (out2 is [tokens, out_local])."""
    whole = seg.groups == 1 and seg.width == out2.shape[1]
    if whole and out2.dtype == h.dtype:
        out2.addmm_(h, b.t(), alpha=seg.scaling)
        return
    delta = F.linear(h, b)
    if whole:
        out2.add_(delta.to(out2.dtype), alpha=seg.scaling)
        return
    period = seg.period or out2.shape[1]
    rows = out2.view(out2.shape[0], seg.groups, period)[:, :, seg.offset : seg.offset + seg.width]
    rows.add_(delta.view(rows.shape).to(out2.dtype), alpha=seg.scaling)


class LoraColumnParallelLinear(_LoraMixin, ColumnParallelLinear):
    """ColumnParallelLinear with LoRA adapters: A replicated, B split like W."""

    parallel_mode = "column"
    _base_axis_map = {"weight": 0, "bias": 0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_lora()

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None):
        if weight is not None or self.explicit_expert_comm:
            raise NotImplementedError("LoRA on a column layer with an external weight or expert comm")
        x = collectives.column_input(input_, self.sequence_parallel, self.tp_group)
        bias = self.bias if not self.skip_bias_add else None
        out = self._linear(x, bias)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        out = collectives.column_output(out, gather, self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)


class LoraRowParallelLinear(_LoraMixin, RowParallelLinear):
    """RowParallelLinear with LoRA adapters: A split like W, B replicated."""

    parallel_mode = "row"
    _base_axis_map = {"weight": 1}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_lora()

    def forward(self, input_: torch.Tensor):
        if self.explicit_expert_comm:
            raise NotImplementedError("LoRA on a row layer with expert comm")
        x = collectives.row_input(input_, self.input_is_parallel, self.tp_group)
        partial = self._linear(x, None)
        out = collectives.row_output(partial, self.sequence_parallel, self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return out, (self.bias if self.skip_bias_add else None)
        return out + self.bias, None


LORA_CLASSES: dict[type, type] = {
    ColumnParallelLinear: LoraColumnParallelLinear,
    RowParallelLinear: LoraRowParallelLinear,
    LoraColumnParallelLinear: LoraColumnParallelLinear,
    LoraRowParallelLinear: LoraRowParallelLinear,
}


def add_lora_support(module: nn.Module) -> _LoraMixin:
    """Turn a ColumnParallelLinear / RowParallelLinear into its LoRA subclass, in place.

    Parameters, buffers, hooks and state-dict keys stay as they are; the instance only
    gains the adapter containers. Any other class is refused by name.
    """
    cls = LORA_CLASSES.get(type(module))
    if cls is None:
        raise TypeError(
            f"cannot add LoRA to {type(module).__module__}.{type(module).__qualname__}: "
            f"supported classes are {sorted(c.__name__ for c in LORA_CLASSES)}"
        )
    if type(module) is not cls:
        module.__class__ = cls
        module.init_lora()
    return module


def lora_layers(model: nn.Module) -> Iterable[tuple[str, _LoraMixin]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, _LoraMixin))
