"""X-LoRA's mixing of LoRA experts inside one LoRA layer, as an extra term of the layer.

For each segment the experts adapt, the term adds

    sum_i s_i(token, layer) * scaling_i * (x A_i^T) B_i^T

to the segment's output rows, where ``s_i`` are the per-token scalings of the segment's
X-LoRA layer index. The experts stay adapters of the layer (inactive as plain LoRA). Which
experts each segment has, and the column layout of their stacked factors, are fixed once
when the term is built. Without active dropout the experts of a segment are stacked: one
GEMM with the [sum r, in] stacked A, per-token scaling of each expert's r columns, one GEMM
with the [out, sum r] stacked B. With active dropout each expert draws its own mask.
The compute dtype follows the layer's precision rule (``megatron_lora.parallel.lora_layers``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from megatron_lora.parallel.lora_layers import LoraLayer, Segment, add_rows


class ScalingsSource(Protocol):
    def for_layer(self, index: int) -> Optional[torch.Tensor]:
        """Scalings [tokens, n_experts] of X-LoRA layer ``index`` (None: all zero, skip)."""


@dataclass(frozen=True)
class SegmentExperts:
    """The experts of one segment, in stacking order."""

    #: X-LoRA layer index of the segment.
    index: int
    #: (expert number, adapter name, the adapter's segment) per expert.
    experts: tuple[tuple[int, str, Segment], ...]
    #: The rows the segment writes (scaling 1: the experts' scalings are in ``column_scaling``).
    rows: Segment
    #: [sum r] expert number of each stacked rank column, on the layer's device.
    columns: torch.Tensor
    #: [sum r] the LoRA scaling of each stacked rank column (fp32), on the layer's device.
    column_scaling: torch.Tensor


class XLoraMixing:
    """The extra term of one LoRA layer mixing X-LoRA experts (``LoraLayer.extra_terms``)."""

    def __init__(self, layer: LoraLayer, source: ScalingsSource, experts: list[str], layer_index: dict[str, int]):
        """``experts``: adapter names in expert order; ``layer_index``: segment name ->
        X-LoRA layer index, for the segments this layer mixes."""
        self.source = source
        device = layer.weight.device
        self.segments: list[SegmentExperts] = []
        for seg_name, index in layer_index.items():
            found = tuple(
                (i, name, seg)
                for i, name in enumerate(experts)
                if name in layer.lora_specs
                for seg in layer.lora_specs[name].segments
                if seg.name == seg_name
            )
            if not found:
                continue
            columns = [i for i, _, seg in found for _ in range(seg.r)]
            scaling = [seg.scaling for _, _, seg in found for _ in range(seg.r)]
            self.segments.append(SegmentExperts(
                index=index,
                experts=found,
                rows=dataclasses.replace(found[0][2], scaling=1.0),
                columns=torch.tensor(columns, dtype=torch.long, device=device),
                column_scaling=torch.tensor(scaling, dtype=torch.float32, device=device),
            ))

    def __call__(self, layer: LoraLayer, x2: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
        if layer.merged_adapters:
            raise ValueError("X-LoRA cannot run with merged adapters: call unmerge_lora first")
        for group in self.segments:
            scalings = self.source.for_layer(group.index)  # [tokens, n_experts]
            if scalings is None:
                continue
            factors = [layer.factors(name, seg, x2.dtype) for _, name, seg in group.experts]
            dropouts = [layer.lora_specs[name].dropout for _, name, _ in group.experts]
            if layer.training and any(p > 0.0 for p in dropouts):
                for (i, _, seg), (a, b), p in zip(group.experts, factors, dropouts):
                    coef = scalings[:, i : i + 1].to(a.dtype) * seg.scaling
                    h = F.linear(layer.lora_input(x2, p).to(a.dtype), a) * coef
                    add_rows(out2, group.rows, h, b)
                continue
            a = torch.cat([a for a, _ in factors], 0)
            b = torch.cat([b for _, b in factors], 1)
            coef = scalings.to(a.dtype)[:, group.columns] * group.column_scaling.to(a.dtype)
            add_rows(out2, group.rows, F.linear(x2.to(a.dtype), a) * coef, b)
        return out2
