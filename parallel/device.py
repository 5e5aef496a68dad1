"""The one device rule: every tensor of a process lives on ``device()``."""

from __future__ import annotations

import torch


def device() -> torch.device:
    """The current CUDA device with CUDA, else the CPU.

    Parameters, activations, KV caches, sampling generators and the small tensors of
    bookkeeping collectives all go here (NCCL only communicates device tensors). Inputs
    given on the CPU are moved here once, where they enter.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
