"""The import path the README documents; the code lives in :mod:`megatron_lora.formats.peft` and
:mod:`megatron_lora.model.adapters` (``load_any_adapter`` is ``load_adapter``, which reads both
PEFT directories and megatron-lora checkpoints)."""

from megatron_lora.formats.peft import PeftReader, megatron_to_peft, peft_to_megatron, read_peft_config, reshard
from megatron_lora.model.adapters import load_adapter as load_any_adapter

__all__ = ["PeftReader", "load_any_adapter", "megatron_to_peft", "peft_to_megatron", "read_peft_config", "reshard"]
