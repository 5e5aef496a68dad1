"""DoRA (PEFT's ``use_dora``) on a LoRA layer: the per-row weight norms, the DoRA forward and
the merge/unmerge rule. A mixin that ``megatron_lora.parallel.lora_layers.LoraLayer`` inherits,
so the DoRA math sits in one place apart from the plain-LoRA bookkeeping; the layers' module
docstring states the rule.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from megatron_lora.parallel import collectives
from megatron_lora.parallel.lora_linear import _rows, _with_rows
from megatron_lora.parallel.lora_spec import Segment, compute_dtype


class DoraMixin:
    """DoRA's norms, row factors and forward of a :class:`~megatron_lora.parallel.lora_layers.LoraLayer`."""

    @torch.no_grad()
    def _weight_norms(self, adapters: Iterable[str]) -> dict[tuple[str, str], torch.Tensor]:
        """(adapter, segment) -> ||W + s B A|| per output row (fp32, no autograd) of the DoRA
        segments of ``adapters`` and this layer's base weight; a row layer sums the squared
        partial norms of all of them in one all-reduce."""
        keys, parts = [], []
        for name in adapters:
            if self.lora_specs[name].dora:
                for seg in self.lora_specs[name].segments:
                    keys.append((name, seg.name))
                    parts.append(self._squared_norms(name, seg))
        if not parts:
            return {}
        squares = torch.cat(parts)
        if self.parallel_mode == "row":
            collectives.sum_over_ranks(squares, self.tp_group)
        # A zero row (the TP padding of an output layer's vocabulary) gets ratio m / tiny = 0
        # for its m = 0 instead of 0 / 0, which would poison the gradient norm.
        norms = squares.sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        return dict(zip(keys, norms.split([p.numel() for p in parts])))

    def _squared_norms(self, adapter: str, seg: Segment) -> torch.Tensor:
        """This rank's part of the squared norm of each output row of W + s B A (fp32)."""
        w = self._weight_rows(seg).float().reshape(-1, self.weight.shape[1])
        return (w + self._delta_weight(adapter, seg)).square().sum(1)

    def _row_factor(self, seg: Segment, v: torch.Tensor) -> torch.Tensor:
        """A per-row vector of ``seg`` shaped to scale :meth:`_weight_rows`."""
        return v.view(seg.groups, seg.width, 1)

    def _dora_linear(self, x2: torch.Tensor, bias: torch.Tensor | None, adapters: list[str]) -> torch.Tensor:
        """PEFT's forward with DoRA adapters, adapter by adapter: a DoRA segment's rows become
        ``rows + (m/n - 1) base + (m/n) s (x' A^T) B^T``, ``base`` being the running rows
        without the bias, or ``x' W^T`` when dropout makes ``x'`` differ from ``x`` (PEFT
        recomputes the base product then). A plain adapter adds its term as usual. Written
        as plain autograd ops: m's gradient comes from autograd, the norm ``n`` is a constant.
        """
        first = self.lora_A[adapters[0]][self.lora_specs[adapters[0]].segments[0].name]
        dtype = compute_dtype(self.lora_compute_dtype, first.dtype, x2.dtype)
        out = F.linear(x2, self.weight, bias).to(dtype)
        norms = self._weight_norms(adapters)
        for name in adapters:
            spec = self.lora_specs[name]
            xin = self.lora_input(x2, spec.dropout)
            for seg in spec.segments:
                a, b, *m = self.factors(name, seg, x2.dtype, magnitude=spec.dora)
                lora = F.linear(F.linear(xin.to(a.dtype), a), b) * seg.scaling
                rows = _rows(out, seg)
                if not spec.dora:
                    out = _with_rows(out, seg, rows + lora)
                    continue
                if xin is not x2:
                    base = F.linear(xin.to(dtype), self._weight_rows(seg).reshape(-1, self.weight.shape[1]).to(dtype))
                elif bias is not None:
                    base = rows - _rows(bias.view(1, -1), seg).to(dtype)
                else:
                    base = rows
                ratio = m[0].float() / norms[(name, seg.name)]
                out = _with_rows(out, seg, rows + (ratio - 1).to(dtype) * base + ratio.to(dtype) * lora)
        return out.to(x2.dtype)


def _merged(w: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """A merged weight: ``W + delta``, or DoRA's ``factor (W + delta)``."""
    return w + delta if factor is None else factor * (w + delta)


def _unmerged(w: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`_merged` (PEFT's unmerge)."""
    return w - delta if factor is None else w / factor - delta
