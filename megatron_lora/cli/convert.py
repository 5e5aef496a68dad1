"""``megatron-lora convert`` and ``inspect``, and ``--verify`` against HF + PEFT."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from megatron_lora.formats.detect import Format
from megatron_lora.hf.layout import MOE_LAYOUTS

#: --verify tolerance: max |logit diff| <= VERIFY_TOL x max |logit| (fp32).
VERIFY_TOL = 1e-5


class VerificationFailed(ValueError):
    """--verify found logits that differ from HF + PEFT's."""


def verify(hf_dir: str | Path, peft_dir: str | Path, megatron_dir: str | Path, seq_len: int = 16) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of HF + PEFT(``peft_dir``) vs our TP=1 model
    with ``megatron_dir``, in fp32 on one fixed prompt. Runs in this single process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.adapters import load_adapter
    from megatron_lora.parallel.lora_layers import LoraComputeDtype, configure_lora_layers
    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.runtime.generation import forward_logits

    init_distributed(1)
    model, facts = load_hf_base(hf_dir, torch.float32)
    load_adapter(model, megatron_dir)
    configure_lora_layers(model, compute_dtype=LoraComputeDtype.FP32)  # PEFT's precision rule
    ids = torch.randint(0, facts.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    ours = forward_logits(model, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.float()
    return (ours - theirs).abs().max().item(), theirs.abs().max().item()


def _run_convert(args: argparse.Namespace) -> int:
    from megatron_lora.formats.convert import base_expert_names, base_facts, convert
    from megatron_lora.formats.detect import detect
    from megatron_lora.formats.xlora import read_xlora

    # Flags first: nothing is read or written for a command that cannot run.
    source_format = detect(args.src)
    xlora = source_format.is_xlora
    if args.verify and args.base is None:
        raise ValueError("--verify needs --base (the HF model to run)")
    if args.verify and xlora:
        raise ValueError(f"--verify runs LoRA adapters only; {args.src} is an X-LoRA directory")
    if args.confine_experts and not xlora:
        raise ValueError(f"--confine-experts applies to X-LoRA directories; {args.src} is not one")
    if args.moe_layout != "fused" and args.to != "peft":
        raise ValueError(f"--moe-layout {args.moe_layout} applies to PEFT outputs (--to peft)")
    if args.moe_layout == "per-expert" and args.base is None:
        raise ValueError("--moe-layout per-expert needs --base (the model type names the expert modules)")
    facts = base_facts(args.base) if args.base else None
    expert_names = base_expert_names(args.base) if args.base else None
    check = None
    if args.verify:
        check = lambda tmp: _verify_output(args, source_format, tmp)  # noqa: E731
    if xlora:
        _print_expert_origins(args.src, read_xlora(args.src, args.confine_experts).experts, args.dst)
    convert(args.src, args.dst, args.to, facts=facts, tp=args.tp, overwrite=args.overwrite, check=check,
            confine_experts=args.confine_experts, moe_layout=args.moe_layout, expert_names=expert_names)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0


def _verify_output(args: argparse.Namespace, source_format: Format, out: Path) -> None:
    """--verify on the finished output ``out``, before it is renamed to DST."""
    from megatron_lora.formats.convert import convert

    with tempfile.TemporaryDirectory() as scratch:
        if args.to == "peft":
            peft_dir, megatron_dir = out, args.src
        elif source_format is Format.PEFT_LORA:
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
    p.add_argument("--moe-layout", choices=MOE_LAYOUTS, default="fused",
                   help="PEFT output of a mixture of experts' expert and router LoRAs: 'fused' (default): "
                   "transformers 5's fused experts through target_parameters (needs lora_dropout 0); "
                   "'per-expert': transformers 4's modules experts.E.gate_proj|up_proj|down_proj (Mixtral: "
                   "w1|w3|w2) and gate (needs --base). A PEFT SRC may hold either")
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
    print(f"format:       {info['format']}" + (f" (version {info['version']})" if info["version"] else ""))
    print(f"tp size:      {info['tp_size']}")
    print(f"modules:      {info['modules']['column']} column-parallel, {info['modules']['row']} row-parallel, "
          f"{info['modules']['replicated']} replicated")
    for module, source in info["tied"].items():
        print(f"tied:         {module} uses {source}'s adapter, transposed (ensure_weight_tying)")
    print(f"targets:      {info['target_modules']}")
    if info["target_parameters"]:
        print(f"target params: {info['target_parameters']}")
    print(f"use_rslora:   {info['use_rslora']}")
    print(f"use_dora:     {info['use_dora']}" + (" (a magnitude per segment row)" if info["use_dora"] else ""))
    print(f"parameters:   {info['parameters']:,}")
    _print_segments(info["segments"])
    if info["experts"]:
        print("experts:" + (f"      {info['moe_layout']} layout (PEFT)" if info["moe_layout"] else ""))
    for seg, v in info["experts"].items():
        where = "; ".join(f"layer {i}" + (f" experts {_ranges(e)}" if e else "") for i, e in v["layers"].items())
        print(f"  {seg:<12} {where}  r {v['r']}  lora_alpha {v['lora_alpha']}")
    return 0


def _print_segments(segments: dict, indent: str = "  ") -> None:
    for seg, v in segments.items():
        # The embedding and lm_head sit in no layer.
        where = f"layers {_ranges(v['layers'])}" if v["layers"] else "(no layer)"
        print(f"{indent}{seg:<12} {where}  r {v['r']}  lora_alpha {v['lora_alpha']}")


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
