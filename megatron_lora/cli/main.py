"""The ``megatron-lora`` command: ``finetune``, ``generate``, ``convert``, ``inspect``, ``plot-scalings``.

Each subcommand is one ``add_<name>(subparsers)`` function registered in :data:`COMMANDS`;
it sets ``func`` (called with the parsed arguments, returns the exit status).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from megatron_lora.cli.convert import add_convert, add_inspect
from megatron_lora.cli.finetune import add_finetune
from megatron_lora.cli.generate import add_generate
from megatron_lora.cli.plots import add_plot_scalings
from megatron_lora.errors import INPUT_ERRORS


def run_entry(fn: Callable[[], Optional[int]], prog: str) -> int:
    """Run an entry point's ``fn``; return its exit status.

    Bad input (:data:`errors.INPUT_ERRORS`) is printed as one line, by rank 0 only under
    torchrun (every rank checks the same input), and gives status 1; any other exception
    is a bug and propagates with its traceback.
    """
    try:
        return fn() or 0
    except INPUT_ERRORS as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1


#: Subcommands, in --help order. Add a command by appending its ``add_*`` function.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_finetune, add_generate, add_convert, add_inspect, add_plot_scalings]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-lora",
        description="Tensor-parallel LoRA for megatron-core: fine-tuning, generation, adapter conversion, inspection and X-LoRA plots.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[list[str]] = None, prog: str = "megatron-lora") -> int:
    """Run a subcommand; ``prog`` names the program in error lines (a script's own name)."""
    args = build_parser().parse_args(argv)
    return run_entry(lambda: args.func(args), prog)


if __name__ == "__main__":
    sys.exit(main())
