"""Conversion plans: an output tensor as its key, shape, dtype and a function reading it, so
``convert`` can stream a conversion to disk tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its key, shape, safetensors dtype name and how to read it."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], torch.Tensor]


def bind(fn: Callable[..., torch.Tensor], *args) -> Callable[[], torch.Tensor]:
    """A plan's ``read``: ``fn(*args)``, deferred until the tensor is written."""
    return lambda: fn(*args)
