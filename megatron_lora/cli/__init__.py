"""The command-line application: ``megatron-lora convert|inspect|plot-scalings``."""

from megatron_lora.cli.main import main

__all__ = ["main"]
