"""The order of training samples (a contract): which samples form global batch k, and which
of them each data-parallel rank takes.

Epoch e is a permutation of the samples drawn from (seed, e); global batch k is items
[kG, (k+1)G) of the concatenated epochs; data-parallel rank d takes the d-th contiguous
G/DP slice of it and splits that into micro-batches in order. So a run resumed at step k
continues with global batch k at any data-parallel size.
"""

from __future__ import annotations

import torch


def epoch_permutation(n_samples: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_samples, generator=gen).tolist()


def batch_indices(n_samples: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Sample indices of global batch ``step`` (0-based)."""
    if n_samples <= 0:
        raise ValueError("the training data holds no samples")
    first = step * global_batch_size
    out: list[int] = []
    epoch, offset = divmod(first, n_samples)
    while len(out) < global_batch_size:
        perm = epoch_permutation(n_samples, seed, epoch)
        out.extend(perm[offset: offset + global_batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


def rank_micro_batches(indices: list[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """Data-parallel rank ``dp_rank``'s micro-batches of one global batch."""
    if len(indices) % (dp_size * micro_batch_size):
        raise ValueError(f"global batch {len(indices)} is not a multiple of "
                         f"data-parallel size {dp_size} x micro batch {micro_batch_size}")
    share = len(indices) // dp_size
    mine = indices[dp_rank * share: (dp_rank + 1) * share]
    return [mine[i: i + micro_batch_size] for i in range(0, share, micro_batch_size)]
