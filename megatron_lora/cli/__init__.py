"""The command-line application: ``megatron-lora convert|inspect|plot-scalings``."""

from megatron_lora.cli.main import main, run_entry

__all__ = ["main", "run_entry"]
