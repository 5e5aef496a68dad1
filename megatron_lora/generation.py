"""The import path the README documents; the code lives in :mod:`megatron_lora.runtime.generation`."""

from megatron_lora.runtime.generation import forward_logits, generate

__all__ = ["forward_logits", "generate"]
