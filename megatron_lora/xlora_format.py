"""The import path the README documents; the code lives in :mod:`megatron_lora.formats.xlora`
(directory formats) and :mod:`megatron_lora.model.xlora` (loading onto and saving from a model)."""

from megatron_lora.formats.xlora import XLoraBundle, read_xlora, write_megatron_xlora, write_peft_xlora
from megatron_lora.model.xlora import load_xlora, save_xlora

__all__ = ["XLoraBundle", "load_xlora", "read_xlora", "save_xlora", "write_megatron_xlora", "write_peft_xlora"]
