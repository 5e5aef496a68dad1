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


def _bind(fn, *args) -> Callable[[], torch.Tensor]:
    return lambda: fn(*args)
