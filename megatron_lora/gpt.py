"""The import path the README documents; the code lives in :mod:`megatron_lora.model.gpt`."""

from megatron_lora.model.gpt import DTYPES, build_gpt, gpt_config, positions_for, real_vocab_size

__all__ = ["DTYPES", "build_gpt", "gpt_config", "positions_for", "real_vocab_size"]
