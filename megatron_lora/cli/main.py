"""The ``megatron-lora`` command.

Each subcommand is one ``add_<name>(subparsers)`` function registered in :data:`COMMANDS`;
it sets ``func`` (called with the parsed arguments, returns the exit status).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

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


class VerificationFailed(ValueError):
    """--verify found logits that differ from HF + PEFT's."""


def _run_convert(args: argparse.Namespace) -> int:
    from megatron_lora.formats.convert import base_facts, convert
    from megatron_lora.formats.peft import detect_format
    from megatron_lora.formats.xlora import is_xlora_dir, read_xlora

    # Flags first: nothing is read or written for a command that cannot run.
    xlora = is_xlora_dir(args.src)
    if args.verify and args.base is None:
        raise ValueError("--verify needs --base (the HF model to run)")
    if args.verify and xlora:
        raise ValueError(f"--verify runs LoRA adapters only; {args.src} is an X-LoRA directory")
    if args.confine_experts and not xlora:
        raise ValueError(f"--confine-experts applies to X-LoRA directories; {args.src} is not one")
    facts = base_facts(args.base) if args.base else None
    check = None
    if args.verify:
        source_format = detect_format(args.src)
        check = lambda tmp: _verify_output(args, source_format, tmp)  # noqa: E731
    if xlora:
        _print_expert_origins(args.src, read_xlora(args.src, args.confine_experts).experts, args.dst)
    convert(args.src, args.dst, args.to, facts=facts, tp=args.tp, overwrite=args.overwrite, check=check,
            confine_experts=args.confine_experts)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0


def _verify_output(args: argparse.Namespace, source_format: str, out: Path) -> None:
    """--verify on the finished output ``out``, before it is renamed to DST."""
    from megatron_lora.formats.convert import VERIFY_TOL, convert, verify

    with tempfile.TemporaryDirectory() as scratch:
        if args.to == "peft":
            peft_dir, megatron_dir = out, args.src
        elif source_format == "peft":
            peft_dir, megatron_dir = args.src, out
        else:  # megatron -> megatron: compare against the new checkpoint exported to PEFT
            peft_dir, megatron_dir = convert(out, Path(scratch) / "peft", "peft", progress=False), out
        diff, scale = verify(args.base, peft_dir, megatron_dir)
    print(f"verify: max |logit diff| = {diff:.3e} (max |logit| = {scale:.3e}, tolerance {VERIFY_TOL:g} x that)")
    if diff > VERIFY_TOL * scale:
        raise VerificationFailed(f"verification failed: {diff:.3e} > {VERIFY_TOL:g} x {scale:.3e}; "
                                 f"{args.dst} not written")


def _print_expert_origins(src: str, experts: dict, dst: str) -> None:
    """Where each X-LoRA expert comes from (a config may point outside the directory)."""
    from megatron_lora.formats.xlora import expert_inside

    for name, path in experts.items():
        where = "inside" if expert_inside(src, path) else "OUTSIDE"
        print(f"expert {name!r}: {Path(path).resolve()} ({where} {src}; copied into {dst})", file=sys.stderr)


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a LoRA or X-LoRA adapter between PEFT and megatron-lora formats",
        description="Convert SRC (a PEFT LoRA directory or a megatron-lora checkpoint, detected) into DST. "
        "megatron -> megatron at another --tp reshards. Written tensor by tensor into a temporary "
        "directory that is renamed to DST at the end. An X-LoRA SRC (PEFT X-LoRA, as peft 0.21.2 "
        "saves it or as intended, the xlora package's layout, or a megatron-lora X-LoRA checkpoint) "
        "becomes a megatron-lora X-LoRA checkpoint (experts as sub-checkpoints) or the intended "
        "PEFT X-LoRA layout.",
    )
    p.add_argument("src", metavar="SRC", help="adapter directory to read")
    p.add_argument("dst", metavar="DST", help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=("peft", "megatron"), help="output format")
    p.add_argument("--base", metavar="HF_DIR",
                   help="HF base model directory (its config.json; weights only with --verify); "
                   "required for a PEFT source, checked against a megatron-lora source")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor-parallel size of a megatron-lora output (default: the source's, 1 for PEFT)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--verify", action="store_true",
                   help="run HF + PEFT and the megatron-lora model (TP=1, fp32) on one prompt before DST "
                   "is put in place; nothing is written if the logits differ by more than 1e-5 x the "
                   "logit scale (needs peft)")
    _add_confine_experts(p)
    p.set_defaults(func=_run_convert)


def _add_confine_experts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--confine-experts", action="store_true",
                   help="X-LoRA: refuse expert paths (in the config's adapters) that resolve outside the "
                   "directory; without it they may point anywhere, as in PEFT, and each expert's location "
                   "is printed")


def _run_inspect(args: argparse.Namespace) -> int:
    from megatron_lora.formats.convert import describe

    info = describe(args.dir, args.confine_experts)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if info["kind"] == "xlora":
        return _print_xlora(info)
    print(f"format:       {info['format']}")
    print(f"tp size:      {info['tp_size']}")
    print(f"targets:      {info['target_modules']}")
    print(f"use_rslora:   {info['use_rslora']}")
    print(f"parameters:   {info['parameters']:,}")
    _print_segments(info["segments"])
    return 0


def _print_segments(segments: dict, indent: str = "  ") -> None:
    for seg, v in segments.items():
        print(f"{indent}{seg:<12} layers {_ranges(v['layers'])}  r {v['r']}  lora_alpha {v['lora_alpha']}")


def _print_xlora(info: dict) -> int:
    c = {k: v for k, v in info["classifier"].items() if k != "shapes"}
    print(f"format:       {info['format']}")
    print(f"kind:         {info['kind']}")
    print(f"tp size:      {info['tp_size']}")
    print(f"scalings:     n_layers {info['n_layers']} x n_experts {info['n_experts']}")
    print(f"classifier:   depth {c.pop('xlora_depth')}, size {c.pop('xlora_size')}, "
          f"dropout {c.pop('xlora_dropout_p')}, shapes {info['classifier']['shapes']}")
    print("options:      " + ", ".join(f"{k} {v}" for k, v in c.items()))
    print(f"parameters:   classifier {info['parameters']['classifier']:,}, experts {info['parameters']['experts']:,}")
    for name, e in info["experts"].items():
        where = "inside" if e["inside"] else "OUTSIDE"
        print(f"expert {name!r}:  {e['format']} at {e['path']} ({where} the directory)")
        print(f"  targets {e['target_modules']}  use_rslora {e['use_rslora']}  parameters {e['parameters']:,}")
        _print_segments(e["segments"], indent="    ")
    return 0


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="describe a LoRA or X-LoRA adapter directory",
        description="Print the format, TP size, targets, ranks, alphas and parameter count of DIR "
        "(a PEFT LoRA directory or a megatron-lora checkpoint). For an X-LoRA directory (any layout): "
        "the layout, the classifier's options, n_layers x n_experts, each expert and parameter counts.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    _add_confine_experts(p)
    p.set_defaults(func=_run_inspect)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ",".join(out)


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


#: Subcommands, in --help order. Add a command by appending its ``add_*`` function.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_convert, add_inspect, add_plot_scalings]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-lora",
        description="Tensor-parallel LoRA for megatron-core: adapter conversion, inspection and X-LoRA plots.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry(lambda: args.func(args), "megatron-lora")


if __name__ == "__main__":
    sys.exit(main())
