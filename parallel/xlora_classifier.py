"""The X-LoRA classifier with its parameters split over tensor-parallel ranks.

The unsharded classifier (PEFT's) is an MLP over the final hidden state: depth 1 is one
Linear(hidden -> out); depth d >= 2 is Linear(hidden -> size), ReLU, Dropout, then
(d - 2) x [Linear(size -> size), ReLU, Dropout], then Linear(size -> out), with
out = n_classes * (n_layers if layerwise else 1).

Sharding: counted from the END, linears alternate row-parallel (input split, partial
products summed by one all-reduce) and column-parallel (output split, no collective). The
last linear is always row-parallel, so ``out`` (n_layers x n_classes, rarely divisible by
N) is never split and the result is replicated on every rank, ready for every LoRA layer
without a further collective. Depth d costs ceil(d / 2) all-reduces of activations, every
weight is split (each rank holds about 1/N of the parameters; only the small biases of
row-parallel linears are replicated). Gradients need no extra reduction: split
parameters get complete local gradients, replicated biases identical ones.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch import nn

from megatron_lora.parallel import collectives
from megatron_lora.parallel.device import device


def linear_styles(depth: int) -> list[str]:
    """"row" or "column" for each linear of a classifier of ``depth`` (last one is "row")."""
    if depth < 1:
        raise ValueError(f"xlora_depth must be at least 1, got {depth}")
    return ["row" if (depth - 1 - k) % 2 == 0 else "column" for k in range(depth)]


def linear_shapes(depth: int, hidden: int, size: int, out: int) -> list[tuple[int, int]]:
    """(in, out) of each linear, full (TP=1) shapes."""
    dims = [hidden] + [size] * (depth - 1) + [out]
    return [(dims[k], dims[k + 1]) for k in range(depth)]


def check_tp(depth: int, hidden: int, size: int, world: int) -> None:
    """Refuse a TP size that does not divide a dimension the classifier splits."""
    for (fan_in, fan_out), style in zip(linear_shapes(depth, hidden, size, 0), linear_styles(depth)):
        split = fan_out if style == "column" else fan_in  # "out" (0 here) is never split
        if split % world:
            raise ValueError(
                f"tensor parallel size {world} does not divide the classifier's "
                f"{'xlora_size' if split == size else 'hidden_size'}={split}"
            )


def split_dims(style: str) -> tuple[int, Optional[int]]:
    """(weight dim, bias dim or None) split over TP for a linear of ``style``."""
    return (0, 0) if style == "column" else (1, None)


def shard_linear(weight: torch.Tensor, bias: torch.Tensor, style: str, rank: int, world: int):
    """This rank's (weight, bias) of a full linear."""
    wdim, bdim = split_dims(style)
    w = weight.chunk(world, wdim)[rank]
    b = bias if bdim is None else bias.chunk(world, bdim)[rank]
    return w.contiguous(), b.contiguous()


def unshard_linear(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], style: str):
    """The full (weight, bias) from every rank's shards, in rank order."""
    wdim, bdim = split_dims(style)
    return torch.cat(list(weights), wdim), biases[0] if bdim is None else torch.cat(list(biases), bdim)


class _ShardedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, style: str, world: int):
        super().__init__()
        self.style = style
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        wdim, bdim = split_dims(style)
        if world > 1:
            set_tensor_model_parallel_attributes(self.weight, True, wdim, 1)
            if bdim is not None:
                set_tensor_model_parallel_attributes(self.bias, True, bdim, 1)


class ShardedXLoraClassifier(nn.Module):
    """Predicts per-token scalings [batch, seq, n_layers, n_classes] from hidden states.

    ``forward`` takes the hidden states replicated on every TP rank ([batch, seq, hidden])
    and returns the scalings replicated on every rank, equal to the unsharded classifier's.
    """

    def __init__(
        self,
        hidden_size: int,
        n_classes: int,
        n_layers: int,
        depth: int = 1,
        size: int = 2048,
        dropout_p: float = 0.2,
        layerwise_scalings: bool = False,
        enable_softmax: bool = True,
        softmax_temperature: float = 1.0,
        tp_group=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.n_classes, self.n_layers = n_classes, n_layers
        self.dropout_p = dropout_p
        self.layerwise_scalings = layerwise_scalings
        self.enable_softmax = enable_softmax
        self.softmax_temperature = softmax_temperature
        self.tp_group = tp_group
        rank, world = self._rank_world()
        out = n_classes * (n_layers if layerwise_scalings else 1)
        self.styles = linear_styles(depth)
        self.shapes = linear_shapes(depth, hidden_size, size, out)
        check_tp(depth, hidden_size, size, world)
        linears = []
        for (fan_in, fan_out), style in zip(self.shapes, self.styles):
            # nn.Linear's default init drawn at full shape from the CPU generator, so TP=N
            # starts where TP=1 (and PEFT) does on any device; each rank keeps its shards.
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.empty(fan_out, fan_in, dtype=dtype).uniform_(-bound, bound)
            b = torch.empty(fan_out, dtype=dtype).uniform_(-bound, bound)
            w, b = (t.to(device()) for t in shard_linear(w, b, style, rank, world))
            linears.append(_ShardedLinear(w, b, style, world))
        self.linears = nn.ModuleList(linears)

    def _rank_world(self) -> tuple[int, int]:
        if self.tp_group is None:
            return 0, 1
        return torch.distributed.get_rank(self.tp_group), torch.distributed.get_world_size(self.tp_group)

    # -- forward --------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier MLP's output [..., out], replicated on every rank."""
        x = hidden
        sharded = self.tp_group is not None
        for k, lin in enumerate(self.linears):
            if lin.style == "column":
                x = collectives.column_input(x, False, self.tp_group) if sharded else x
                x = F.linear(x, lin.weight, lin.bias)
            else:
                # A row linear after a column one reads its split output as is.
                split = k > 0 and self.linears[k - 1].style == "column"
                x = collectives.row_input(x, split, self.tp_group) if sharded else x
                partial = F.linear(x, lin.weight)
                x = (collectives.row_output(partial, False, self.tp_group) if sharded else partial) + lin.bias
            if k < len(self.linears) - 1:
                x = self._dropout(F.relu(x), split=lin.style == "column")
        return x

    def _dropout(self, x: torch.Tensor, split: bool) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return x
        if not split:
            # Replicated activations: the default RNG draws the same mask on every rank.
            return F.dropout(x, self.dropout_p, True)
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, self.dropout_p, True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, s = hidden.shape[:2]
        logits = self.logits(hidden)
        if not self.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(b, s, self.n_layers, self.n_classes)
        if self.enable_softmax:
            scalings = torch.softmax(scalings / self.softmax_temperature, dim=-1)
        return scalings

    # -- full (unsharded) state -------------------------------------------------------------
    def local_state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (weight, bias) per linear."""
        return [(lin.weight.detach(), lin.bias.detach()) for lin in self.linears]

    @torch.no_grad()
    def load_full_state(self, linears: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Load unsharded (weight, bias) per linear, keeping this rank's shards."""
        if len(linears) != len(self.linears):
            raise ValueError(f"classifier has {len(self.linears)} linears, got {len(linears)}")
        rank, world = self._rank_world()
        for k, ((w, b), lin, (fan_in, fan_out)) in enumerate(zip(linears, self.linears, self.shapes)):
            if tuple(w.shape) != (fan_out, fan_in) or tuple(b.shape) != (fan_out,):
                raise ValueError(
                    f"classifier linear {k}: got weight {tuple(w.shape)} and bias {tuple(b.shape)}, "
                    f"expected ({fan_out}, {fan_in}) and ({fan_out},)"
                )
            self.load_local(k, *shard_linear(w, b, lin.style, rank, world))

    @torch.no_grad()
    def load_local(self, k: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load this rank's shards of linear ``k``."""
        lin = self.linears[k]
        if weight.shape != lin.weight.shape or bias.shape != lin.bias.shape:
            raise ValueError(
                f"classifier linear {k} shard: got weight {tuple(weight.shape)} and bias "
                f"{tuple(bias.shape)}, this rank holds {tuple(lin.weight.shape)} and {tuple(lin.bias.shape)}"
            )
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
