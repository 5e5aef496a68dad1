"""Heatmaps of X-LoRA scalings (what ``generate.py --scalings-out`` writes).

Needs matplotlib (the ``plot`` extra); it is imported when a plot is drawn, with the Agg
backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import sys
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_lora.errors import require
from megatron_lora.formats.files import read_safetensors
from megatron_lora.formats.outputs import atomic_file


def read_scalings(path: str | Path) -> tuple[torch.Tensor, Optional[list[int]]]:
    """The ``scalings`` [seq, n_layers, n_experts] of a file, and its ``input_ids`` if stored."""
    tensors = read_safetensors(path)
    if "scalings" not in tensors:
        raise ValueError(f"{path} has no 'scalings' tensor (keys: {sorted(tensors)})")
    scalings = tensors["scalings"].float()
    if scalings.dim() != 3:
        raise ValueError(f"{path}: scalings must be [seq, n_layers, n_experts], got shape {tuple(scalings.shape)}")
    ids = tensors.get("input_ids")
    return scalings, None if ids is None else ids.tolist()


def token_labels(ids: Optional[Sequence[int]], seq: int, tokenizer_dir: Optional[str] = None) -> list[str]:
    """Tick labels: the tokens (with a tokenizer), else the ids, else the positions."""
    if ids is None:
        if tokenizer_dir is not None:
            raise ValueError("--tokenizer needs the prompt's ids: --input-ids, or a file that stores input_ids")
        return [str(i) for i in range(seq)]
    if len(ids) != seq:
        raise ValueError(f"{len(ids)} input ids for {seq} positions of scalings")
    if tokenizer_dir is None:
        return [str(i) for i in ids]
    from transformers import AutoTokenizer  # only labelling needs transformers

    return AutoTokenizer.from_pretrained(str(tokenizer_dir)).convert_ids_to_tokens(list(ids))


def plot_scalings(scalings: torch.Tensor, out: str | Path, labels: Sequence[str], average: bool = False) -> Path:
    """Write a PNG heatmap of ``scalings`` [seq, n_layers, n_experts]: experts down, tokens
    across, one panel per X-LoRA layer (or one panel averaged over layers)."""
    matplotlib = require("matplotlib", "plot-scalings", "pip install 'megatron-lora[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq, n_layers, n_experts = scalings.shape
    panels = [("mean over layers", scalings.mean(1))] if average else [
        (f"layer {i}", scalings[:, i]) for i in range(n_layers)]
    cols = 1 if average else min(2, n_layers)
    rows = math.ceil(len(panels) / cols)
    width = max(4.0, 0.3 * seq + 2.0)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, (0.35 * n_experts + 1.2) * rows),
                             squeeze=False, constrained_layout=True)
    vmax = float(scalings.max())
    vmin = min(0.0, float(scalings.min()))
    for ax, (title, values) in zip(axes.flat, panels):
        image = ax.imshow(values.T.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(n_experts), [f"expert {e}" for e in range(n_experts)], fontsize=7)
        ax.set_xticks(range(seq), labels, rotation=90, fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="scaling")
    try:
        with atomic_file(out) as tmp:  # a failure leaves no partial PNG
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return Path(out)


def _run_plot_scalings(args: argparse.Namespace) -> int:
    from megatron_lora.cli.plots import plot_scalings, read_scalings, token_labels

    scalings, ids = read_scalings(args.file)
    if args.input_ids is not None:
        try:
            ids = [int(t) for t in args.input_ids.split(",")]
        except ValueError:
            raise ValueError(f"--input-ids must be comma-separated integers, got {args.input_ids!r}") from None
    labels = token_labels(ids, scalings.shape[0], args.tokenizer)
    print(f"wrote {plot_scalings(scalings, args.output, labels, args.average)}", file=sys.stderr)
    return 0


def add_plot_scalings(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot-scalings",
        help="draw X-LoRA scalings as a heatmap (PNG)",
        description="Heatmap of the X-LoRA scalings in FILE (generate.py --scalings-out: key scalings "
        "[seq, n_layers, n_experts]) per token and expert, one panel per X-LoRA layer or averaged "
        "over layers. Needs matplotlib (pip install 'megatron-lora[plot]').",
    )
    p.add_argument("file", metavar="F.safetensors", help="scalings file")
    p.add_argument("-o", "--output", required=True, metavar="F.png", help="PNG to write")
    p.add_argument("--tokenizer", metavar="HF_DIR", help="label the tokens with this HF tokenizer")
    p.add_argument("--input-ids", metavar="IDS",
                   help="comma-separated prompt ids (default: the input_ids stored in FILE, if any)")
    p.add_argument("--average", action="store_true", help="one panel: the mean over layers")
    p.set_defaults(func=_run_plot_scalings)
