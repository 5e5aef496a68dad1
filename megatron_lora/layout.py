"""Every HF <-> Megatron name and layout rule (LLaMA family, megatron-core local spec).

* Names: HF ``model.layers.{i}.self_attn.q_proj`` <-> Megatron
  ``decoder.layers.{i}.self_attention.linear_qkv`` (segment ``q_proj``), with GLOBAL i.
* Fused rows: Megatron's ``linear_qkv`` at TP=1 is, per query group, ``[q heads of the
  group; k; v]``; rank j of N holds a contiguous chunk of groups. Gated ``linear_fc1`` at
  TP=1 is ``[gate; up]``; rank j holds ``[gate_j; up_j]`` (``blocks=2`` in
  :func:`parallel.lora_layers.shard_rows`).
* LoRA factors: a column module keeps A replicated and B split by rows; a row module
  keeps A split by columns and B replicated. A per-projection segment's B is a contiguous
  row chunk of the PEFT B; a shared-A B is in the fused layout above.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

ALL_LINEAR = "all-linear"
HF_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MEGATRON_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

#: Megatron module -> its path inside a transformer layer.
MODULE_PATH = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}
#: HF projection -> (HF parent module, Megatron module).
PROJECTION = {
    "q_proj": ("self_attn", "linear_qkv"),
    "k_proj": ("self_attn", "linear_qkv"),
    "v_proj": ("self_attn", "linear_qkv"),
    "o_proj": ("self_attn", "linear_proj"),
    "gate_proj": ("mlp", "linear_fc1"),
    "up_proj": ("mlp", "linear_fc1"),
    "down_proj": ("mlp", "linear_fc2"),
}
COLUMN_MODULES = ("linear_qkv", "linear_fc1")
#: HF prefix of PEFT LoRA tensor keys.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ModelFacts:
    """The model dimensions every layout depends on (stored in our checkpoints)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    gated_linear_unit: bool
    vocab_size: int

    @classmethod
    def from_transformer_config(cls, cfg, vocab_size: int) -> "ModelFacts":
        return cls(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
            head_dim=cfg.kv_channels,
            ffn_hidden_size=cfg.ffn_hidden_size,
            gated_linear_unit=cfg.gated_linear_unit,
            vocab_size=vocab_size,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFacts":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def check_tp(self, tp: int) -> None:
        """Refuse a TP size that does not divide what megatron-core splits."""
        for field, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("ffn_hidden_size", self.ffn_hidden_size),
        ):
            if value % tp:
                raise ValueError(f"tensor parallel size {tp} does not divide {field}={value}")

    def projections(self, module: str) -> tuple[str, ...]:
        """HF projections fused into a Megatron module."""
        if module == "linear_fc1" and not self.gated_linear_unit:
            return ("up_proj",)
        return tuple(p for p, (_, m) in PROJECTION.items() if m == module)

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in, out) of the full (TP=1) Megatron module."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        f = self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)
        return {
            "linear_qkv": (h, q + 2 * kv),
            "linear_proj": (q, h),
            "linear_fc1": (h, f),
            "linear_fc2": (self.ffn_hidden_size, h),
        }[module]

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(in, out) of an HF projection."""
        h, d = self.hidden_size, self.head_dim
        return {
            "q_proj": (h, self.num_attention_heads * d),
            "k_proj": (h, self.num_query_groups * d),
            "v_proj": (h, self.num_query_groups * d),
            "o_proj": (self.num_attention_heads * d, h),
            "gate_proj": (h, self.ffn_hidden_size),
            "up_proj": (h, self.ffn_hidden_size),
            "down_proj": (self.ffn_hidden_size, h),
        }[proj]

    def segment_geometry(self, module: str, proj: Optional[str], tp: int) -> dict:
        """Rows a segment writes in the TP-local output (see ``parallel.lora_layers.Segment``).

        ``proj`` None means one shared-A segment over the whole module.
        """
        self.check_tp(tp)
        out_local = self.module_shape(module)[1] // (tp if module in COLUMN_MODULES else 1)
        gated = module == "linear_fc1" and self.gated_linear_unit
        if proj is None or module not in COLUMN_MODULES or (module == "linear_fc1" and not gated):
            return dict(width=out_local, blocks=2 if gated and proj is None else 1)
        if module == "linear_qkv":
            d, p = self.head_dim, self.heads_per_group
            offset, width = {"q_proj": (0, p * d), "k_proj": (p * d, d), "v_proj": ((p + 1) * d, d)}[proj]
            return dict(width=width, groups=self.num_query_groups // tp, period=(p + 2) * d, offset=offset)
        f_local = self.ffn_hidden_size // tp
        return dict(width=f_local, period=2 * f_local, offset=0 if proj == "gate_proj" else f_local)


def hf_module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{PROJECTION[proj][0]}.{proj}"


def megatron_module_name(layer: int, module: str) -> str:
    return f"decoder.layers.{layer}.{MODULE_PATH[module]}"


def factor_split(module: str, factor: str, segment: str, facts: ModelFacts) -> tuple[Optional[int], int]:
    """(dim split over TP or None if replicated, blocks) of a LoRA factor in our checkpoints."""
    if module in COLUMN_MODULES:
        if factor == "lora_A":
            return None, 1
        shared_gated = module == "linear_fc1" and segment == module and facts.gated_linear_unit
        return 0, 2 if shared_gated else 1
    return (1, 1) if factor == "lora_A" else (None, 1)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v rows (for ``groups`` query groups) -> Megatron's interleaved linear_qkv rows."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, 1).reshape(-1, *rest)


def split_qkv(w: torch.Tensor, facts: ModelFacts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` on a full (TP=1) linear_qkv tensor."""
    d, p = facts.head_dim, facts.heads_per_group
    per_group = w.reshape(facts.num_query_groups, (p + 2) * d, *w.shape[1:])
    q, k, v = per_group.split([p * d, d, d], 1)
    return tuple(t.reshape(-1, *w.shape[1:]) for t in (q, k, v))
