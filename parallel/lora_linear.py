"""The fused LoRA linear (``_LinearWithLora``: base GEMM plus every segment's LoRA term as one
autograd node) and the helpers that read or write a segment's rows of a [tokens, out_local]
output. Split from ``megatron_lora.parallel.lora_layers`` (which re-exports ``add_rows``) so
DoRA and X-LoRA's mixing share the row helpers without importing the layer classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lora.parallel import collectives
from megatron_lora.parallel.lora_spec import Segment


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


def _with_rows(t: torch.Tensor, seg: Segment, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` [tokens, out_local] with the columns ``seg`` writes replaced by ``rows``
    (out of place: views of ``t`` may be saved for backward)."""
    if seg.groups == 1 and seg.width == t.shape[1]:
        return rows
    period = seg.period or t.shape[1]
    v = t.view(t.shape[0], seg.groups, period)
    end = seg.offset + seg.width
    parts = (v[:, :, : seg.offset], rows.reshape(t.shape[0], seg.groups, seg.width), v[:, :, end:])
    return torch.cat(parts, 2).view(t.shape)


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
