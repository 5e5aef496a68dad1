"""Every collective a LoRA layer performs, named for what it does to a region.

These are megatron-core's own region mappings; LoRA adds no activation collective of its
own. The base layer's single input-gradient reduction (column) or output reduction (row)
carries the LoRA term too, and the only extra communication is the parameter-gradient sum
of a replicated LoRA factor (size r x hidden per layer and backward pass, independent of
the number of tokens) and, under sequence parallelism when a column layer keeps only its
input shard, one reduce-scatter of the rank-r term ``[tokens, sum r]`` per backward pass.
DoRA on a row layer or the embedding adds one all-reduce of its squared partial row norms
(a vector of output rows) per forward; its replicated magnitude shares B's gradient sum.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel import mappings

from megatron_lora.parallel.device import device


def column_input(x: torch.Tensor, sequence_parallel: bool, group) -> torch.Tensor:
    """The one input both the base GEMM and LoRA read in a column-parallel layer.

    Backward reduces (or reduce-scatters, with sequence parallelism) the sum of both
    branches' input-gradient partials in a single collective.
    """
    if sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=True, group=group
        )
    return mappings.copy_to_tensor_model_parallel_region(x, group=group)


def column_output(y: torch.Tensor, gather: bool, group) -> torch.Tensor:
    return mappings.gather_from_tensor_model_parallel_region(y, group=group) if gather else y


def row_input(x: torch.Tensor, input_is_parallel: bool, group) -> torch.Tensor:
    return x if input_is_parallel else mappings.scatter_to_tensor_model_parallel_region(x, group=group)


def row_output(partial: torch.Tensor, sequence_parallel: bool, group) -> torch.Tensor:
    """Reduce the summed base + LoRA partial products once (reduce-scatter under SP)."""
    if sequence_parallel:
        return mappings.reduce_scatter_to_sequence_parallel_region(partial, group=group)
    return mappings.reduce_from_tensor_model_parallel_region(partial, group=group)


def replicated_factor(weight: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward sums a replicated factor's partial gradient over TP.

    Doing the sum in autograd (rather than in a training-loop hook) makes ``param.grad``
    complete in any loop: a plain ``loss.backward()``, or megatron-core's DDP and
    ``finalize_model_grads`` (which never sums these parameters, since they are not marked
    ``sequence_parallel`` nor ``average_gradients_across_tp_domain``).
    """
    return mappings.copy_to_tensor_model_parallel_region(weight, group=group)


def replicated_factors(tensors: tuple[torch.Tensor, ...], group) -> tuple[torch.Tensor, ...]:
    """:func:`replicated_factor` for several replicated tensors whose gradients are summed
    over TP in one all-reduce (a row layer's DoRA B and magnitude)."""
    return _ReplicatedFactors.apply(group, *tensors)


class _ReplicatedFactors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        if present and torch.distributed.get_world_size(ctx.group) > 1:
            dtype = functools.reduce(torch.promote_types, [g.dtype for g in present])
            flat = torch.cat([g.reshape(-1).to(dtype) for g in present])
            torch.distributed.all_reduce(flat, group=ctx.group)
            parts = iter(flat.split([g.numel() for g in present]))
            grads = tuple(None if g is None else next(parts).view_as(g).to(g.dtype) for g in grads)
        return (None, *grads)


def sum_over_ranks(t: torch.Tensor, group) -> torch.Tensor:
    """Sum a small weight-space tensor over the ranks of ``group``, in place (no autograd:
    DoRA's squared partial row norms)."""
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, group=group)
    return t


def all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate each rank's tensor along dim 0 (no autograd; for checkpoint I/O)."""
    return mappings._gather_along_first_dim(t.contiguous(), group)


def reduce_scatter_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` over ranks and keep this rank's chunk of dim 0 (no autograd; a LoRA
    layer's backward under sequence parallelism)."""
    out = t.new_empty(t.shape[0] // torch.distributed.get_world_size(group), *t.shape[1:])
    torch.distributed.reduce_scatter_tensor(out, t.contiguous(), group=group)
    return out


def send_to_next_stage(t: torch.Tensor, next_rank: int) -> None:
    """Pipeline forward: hand this stage's output activations to the next stage."""
    torch.distributed.send(t.contiguous(), next_rank)


def recv_from_previous_stage(shape, dtype: torch.dtype, prev_rank: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device())
    torch.distributed.recv(out, prev_rank)
    return out


def broadcast_from_last_stage(t: torch.Tensor, last_rank: int, group) -> torch.Tensor:
    """Every pipeline stage gets the last stage's ``t`` (same shape and dtype on all)."""
    torch.distributed.broadcast(t, last_rank, group=group)
    return t
