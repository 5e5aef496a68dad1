"""Which adapter format a directory holds: one detector for every reader and command.

A directory is one of:

* ``PEFT_LORA``: PEFT's ``adapter_config.json`` with ``peft_type: "LORA"``;
* ``MEGATRON_LORA`` / ``MEGATRON_XLORA``: our checkpoint (``"format": "megatron-lora"``,
  ``"kind": "lora"`` / ``"xlora"``);
* ``PEFT_XLORA``: PEFT's ``adapter_config.json`` with ``peft_type: "XLORA"``;
* ``XLORA_PACKAGE``: the original xlora package's ``xlora_config.json``.

Anything else is refused with the reason (missing directory, no config, another PEFT type).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional, Protocol

import torch

from megatron_lora.formats.files import read_json
from megatron_lora.hf.layout import ModelFacts

CONFIG_NAME = "adapter_config.json"
XLORA_PACKAGE_CONFIG = "xlora_config.json"
#: The ``format`` field of our checkpoints' adapter_config.json.
MEGATRON_FORMAT = "megatron-lora"


class Format(enum.Enum):
    PEFT_LORA = "peft-lora"
    MEGATRON_LORA = "megatron-lora"
    PEFT_XLORA = "peft-xlora"
    XLORA_PACKAGE = "xlora-package"
    MEGATRON_XLORA = "megatron-xlora"

    @property
    def is_xlora(self) -> bool:
        return self in (Format.PEFT_XLORA, Format.XLORA_PACKAGE, Format.MEGATRON_XLORA)

    @property
    def is_megatron(self) -> bool:
        return self in (Format.MEGATRON_LORA, Format.MEGATRON_XLORA)


_MEGATRON_KINDS = {"lora": Format.MEGATRON_LORA, "xlora": Format.MEGATRON_XLORA}
_PEFT_TYPES = {"LORA": Format.PEFT_LORA, "XLORA": Format.PEFT_XLORA}


def detect(directory: str | Path) -> Format:
    """The format of the adapter in ``directory``; FileNotFoundError / ValueError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"adapter directory {directory} {what}")
    if (directory / XLORA_PACKAGE_CONFIG).is_file():
        return Format.XLORA_PACKAGE
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} holds no {CONFIG_NAME}: expected a PEFT LoRA / X-LoRA directory, "
            "a megatron-lora checkpoint or an xlora package directory"
        )
    config = read_json(path)
    if config.get("format") == MEGATRON_FORMAT:
        kind = config.get("kind")
        if kind not in _MEGATRON_KINDS:
            raise ValueError(f"{path}: unknown megatron-lora checkpoint kind {kind!r} (expected 'lora' or 'xlora')")
        return _MEGATRON_KINDS[kind]
    peft_type = config.get("peft_type")
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"{path}: peft_type={peft_type!r} is not a LoRA or X-LoRA adapter (expected 'LORA' or 'XLORA')")
    return _PEFT_TYPES[peft_type]


def detect_lora(directory: str | Path) -> Format:
    """Like :func:`detect`, but refuses an X-LoRA directory where a LoRA adapter is needed."""
    fmt = detect(directory)
    if fmt.is_xlora:
        raise ValueError(f"{directory} holds an X-LoRA adapter ({fmt.value}) where a LoRA adapter is needed")
    return fmt


class AdapterReader(Protocol):
    """A LoRA adapter seen through megatron-lora checkpoint keys, at any TP size.

    Implemented by ``formats.checkpoint.ShardReader`` (our checkpoints) and
    ``formats.peft.PeftReader`` (PEFT directories).
    """

    #: The TP size the tensors were saved at (1 for single-device formats).
    saved_tp: int
    #: The model facts the adapter carries (None where the format has none, e.g. PEFT).
    facts: Optional[ModelFacts]

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> list[int]: ...

    def full_shape(self, key: str) -> list[int]: ...

    def dtype(self, key: str) -> str: ...

    def full(self, key: str) -> torch.Tensor: ...

    def local(self, key: str, tp_rank: int, tp_size: int) -> torch.Tensor: ...
