"""The data of a LoRA adapter on one layer and the rules every LoRA layer shares.

:class:`Segment` and :class:`AdapterSpec` describe an adapter; ``shard_rows`` /
``unshard_rows`` split a full tensor's rows over TP; :class:`LoraComputeDtype` and
``compute_dtype`` are the precision rule; ``_initial_factors`` draws PEFT's initial factors.
Kept apart from the layers (``megatron_lora.parallel.lora_layers``, which re-exports them) so
the fused function and DoRA can use them without importing the layer classes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch


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
    dora: bool = False  # PEFT's use_dora: a magnitude per output row of each segment


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
