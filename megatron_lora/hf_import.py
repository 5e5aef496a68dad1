"""The import path the README documents; the code lives in :mod:`megatron_lora.hf.importer`."""

from megatron_lora.hf.importer import eos_token_ids, hf_model_facts, load_hf_base, read_hf_config

__all__ = ["eos_token_ids", "hf_model_facts", "load_hf_base", "read_hf_config"]
