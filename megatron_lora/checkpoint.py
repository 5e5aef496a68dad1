"""Our Megatron adapter checkpoint (DESIGN 4): one safetensors file per TP rank.

Directory layout::

    adapter_config.json       {"format": "megatron-lora", "version": 1, "kind": "lora",
                               "tp_size": N, "lora_config": {...PEFT field names...},
                               "model": {...ModelFacts...}}
    tp_rank_00.safetensors    rank 0's tensors, keys with GLOBAL layer indices:
    tp_rank_01.safetensors    decoder.layers.{i}.self_attention.linear_qkv.lora_A.{segment}

``segment`` is an HF projection (``q_proj`` ...: per-projection LoRA) or the Megatron
module name (``linear_qkv`` ...: one shared-A LoRA over the fused module). Each rank's
tensors have the shape that rank holds (``layout.factor_split``); pipeline stages are
merged. Writers go through :func:`write_checkpoint` (``outputs.atomic_directory``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from megatron_lora.files import json_field, open_safetensors, read_json
from megatron_lora.layout import MODULE_PATH, ModelFacts, factor_split
from megatron_lora.outputs import atomic_directory
from parallel.lora_layers import shard_rows, unshard_rows

FORMAT = "megatron-lora"
VERSION = 1
CONFIG_NAME = "adapter_config.json"
_KEY = re.compile(
    r"decoder\.layers\.(?P<layer>\d+)\.(?P<path>self_attention\.linear_\w+|mlp\.linear_\w+)"
    r"\.(?P<factor>lora_A|lora_B)\.(?P<segment>\w+)$"
)
_MODULE_OF_PATH = {v: k for k, v in MODULE_PATH.items()}


def shard_file(directory: str | Path, tp_rank: int) -> Path:
    return Path(directory) / f"tp_rank_{tp_rank:02d}.safetensors"


def parse_key(key: str) -> tuple[int, str, str, str]:
    """(global layer, Megatron module, factor, segment) of a checkpoint key."""
    m = _KEY.match(key)
    if m is None or m["path"] not in _MODULE_OF_PATH:
        raise ValueError(f"not a megatron-lora adapter key: {key!r}")
    return int(m["layer"]), _MODULE_OF_PATH[m["path"]], m["factor"], m["segment"]


def make_key(layer: int, module: str, factor: str, segment: str) -> str:
    return f"decoder.layers.{layer}.{MODULE_PATH[module]}.{factor}.{segment}"


def read_config(directory: str | Path) -> dict:
    """Read and check adapter_config.json of a megatron-lora checkpoint."""
    cfg = read_json(Path(directory) / CONFIG_NAME)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{directory} is not a megatron-lora checkpoint (format={cfg.get('format')!r})")
    if cfg.get("version") != VERSION:
        raise ValueError(f"{directory}: unsupported megatron-lora checkpoint version {cfg.get('version')!r}")
    for i in range(cfg["tp_size"]):
        if not shard_file(directory, i).is_file():
            raise FileNotFoundError(f"{shard_file(directory, i)} is missing")
    return cfg


def open_shard(directory: str | Path, tp_rank: int):
    """safe_open a rank file, turning a corrupt or truncated file into a clear error."""
    return open_safetensors(shard_file(directory, tp_rank))


class ShardReader:
    """Reads tensors of a checkpoint saved at any TP size, resharded to ``tp_size``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config = read_config(directory)
        self.facts = ModelFacts.from_dict(self.config["model"])
        self.saved_tp = self.config["tp_size"]
        self._files = [open_shard(directory, j) for j in range(self.saved_tp)]

    def keys(self) -> list[str]:
        return sorted(self._files[0].keys())

    def check_model(self, facts: ModelFacts) -> None:
        """Refuse a checkpoint made for another model (the vocabulary does not matter)."""
        saved = ModelFacts.from_dict({**self.config["model"], "vocab_size": facts.vocab_size})
        if saved != facts:
            raise ValueError(f"{self.directory} was made for another model: {saved} vs this model's {facts}")

    def shape(self, key: str) -> list[int]:
        try:
            return self._files[0].get_slice(key).get_shape()
        except Exception as e:
            raise ValueError(f"{shard_file(self.directory, 0)}: cannot read {key!r}: {e}") from None

    def dtype(self, key: str) -> str:
        """safetensors dtype name (``F32``, ``BF16`` ...) of ``key``."""
        return self._files[0].get_slice(key).get_dtype()

    def full_shape(self, key: str) -> list[int]:
        """The TP=1 shape of ``key``, from the file headers only."""
        _, module, factor, segment = parse_key(key)
        dim, _ = factor_split(module, factor, segment, self.facts)
        shape = list(self.shape(key))
        if dim is not None:
            shape[dim] *= self.saved_tp
        return shape

    def full(self, key: str) -> torch.Tensor:
        """The TP=1 tensor of ``key``."""
        _, module, factor, segment = parse_key(key)
        dim, blocks = factor_split(module, factor, segment, self.facts)
        parts = [self._get(j, key) for j in range(self.saved_tp if dim is not None else 1)]
        if dim is None:
            return parts[0]
        if dim == 0:
            return unshard_rows(parts, blocks)
        return torch.cat(parts, dim)

    def local(self, key: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """``key`` as TP rank ``tp_rank`` of ``tp_size`` holds it (reading one file if it can)."""
        _, module, factor, segment = parse_key(key)
        dim, blocks = factor_split(module, factor, segment, self.facts)
        if dim is None:
            return self._get(0, key)
        if tp_size == self.saved_tp:
            return self._get(tp_rank, key)
        full = self.full(key)
        return shard_rows(full, blocks, tp_rank, tp_size) if dim == 0 else full.chunk(tp_size, dim)[tp_rank]

    def _get(self, rank: int, key: str) -> torch.Tensor:
        try:
            return self._files[rank].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{shard_file(self.directory, rank)}: cannot read {key!r}: {e}") from None


def write_checkpoint(
    directory: str | Path,
    config: dict,
    shards: Iterable[Callable[[], dict[str, torch.Tensor]] | dict[str, torch.Tensor]],
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint atomically (``outputs.atomic_directory``).

    ``shards`` yields, per TP rank in order, that rank's tensors (or a callable producing
    them, so a converter holds one rank's tensors at a time).
    """
    with atomic_directory(directory, overwrite) as tmp:
        n = 0
        for j, shard in enumerate(shards):
            write_shard(tmp, j, shard() if callable(shard) else shard)
            n += 1
        if n != config["tp_size"]:
            raise ValueError(f"wrote {n} rank files for tp_size={config['tp_size']}")
        write_config(tmp, config)
    return Path(directory)


def write_shard(tmp: Path, tp_rank: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(shard_file(tmp, tp_rank)))


def write_config(tmp: Path, config: dict) -> None:
    """adapter_config.json of a checkpoint being written into ``tmp``."""
    full_config = {"format": FORMAT, "version": VERSION, **config}
    (tmp / CONFIG_NAME).write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")


def checkpoint_config(kind: str, tp_size: int, facts: ModelFacts, adapter_config: dict, key: str = "lora_config") -> dict:
    return {"kind": kind, "tp_size": tp_size, "model": facts.to_dict(), key: adapter_config}


def is_megatron_checkpoint(directory: str | Path) -> bool:
    return json_field(Path(directory) / CONFIG_NAME, "format") == FORMAT
