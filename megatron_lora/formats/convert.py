"""Disk conversions between PEFT LoRA directories and megatron-lora checkpoints.

X-LoRA directories (any layout of ``xlora_format``) are converted as a whole: the
classifier is (un)sharded and each expert goes through the LoRA conversions in memory
(experts are small); ``describe`` covers them too.

Streaming: each output file is written tensor by tensor from a plan
(``peft_format.TensorPlan``): the safetensors header is computed from the source headers
first, then every tensor is read (only the slice the output needs), written and dropped, so
peak memory is about one tensor, not the adapter. Output goes to a temporary sibling
directory renamed into place at the end (``outputs.atomic_directory``); on any error
nothing is left behind.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from megatron_lora.formats.checkpoint import (
    layout_module,
    module_key,
    segment_name,
    shard_file,
    split_key,
    tied_modules,
    write_config,
)
from megatron_lora.errors import check_positive_int
from megatron_lora.hf.importer import hf_model_facts, read_hf_config
from megatron_lora.hf.layout import HF_PROJECTIONS, LM_HEAD, MOE_HF_NAMES, ModelFacts, MoeNames, parse_moe_module
from megatron_lora.formats.detect import Format, detect
from megatron_lora.formats.outputs import atomic_directory, check_destination
from megatron_lora.formats.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    TensorPlan,
    megatron_plan,
    open_adapter,
    peft_plan,
)
from megatron_lora.formats.xlora import (
    check_bundle,
    expert_inside,
    read_xlora,
    write_megatron_xlora,
    write_peft_xlora,
)

#: safetensors dtype names of the float dtypes adapters are stored in.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def base_facts(hf_dir: str | Path) -> ModelFacts:
    """Model facts of an HF model directory (reads config.json only)."""
    return hf_model_facts(read_hf_config(hf_dir))


def base_expert_names(hf_dir: str | Path) -> Optional[MoeNames]:
    """transformers 4's expert module names of an HF mixture of experts (None: dense model)."""
    return MOE_HF_NAMES.get(read_hf_config(hf_dir).get("model_type"))


def write_safetensors(path: Path, plans: list[TensorPlan], bar: Optional[tqdm] = None) -> None:
    """Write a safetensors file one tensor at a time (header first, from the plans)."""
    for p in plans:
        if p.dtype not in _DTYPES:
            raise ValueError(f"{p.key}: dtype {p.dtype} is not a float dtype of an adapter ({sorted(_DTYPES)})")
    # Larger element sizes first keeps every tensor aligned, as safetensors' own writer does.
    plans = sorted(plans, key=lambda p: (-_DTYPES[p.dtype].itemsize, p.key))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for p in plans:
        size = math.prod(p.shape) * _DTYPES[p.dtype].itemsize
        header[p.key] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for p in plans:
            t = p.read()
            if tuple(t.shape) != tuple(p.shape) or t.dtype != _DTYPES[p.dtype]:
                raise ValueError(f"{p.key}: read {tuple(t.shape)} {t.dtype}, expected {p.shape} {p.dtype}")
            f.write(t.contiguous().view(torch.uint8).numpy().data)
            if bar is not None:
                bar.update(1)


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    facts: Optional[ModelFacts] = None,
    tp: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    check: Optional[Callable[[Path], None]] = None,
    confine_experts: bool = False,
    moe_layout: str = "fused",
    expert_names: Optional[MoeNames] = None,
) -> Path:
    """Convert the adapter in ``src`` (PEFT or megatron-lora, detected) into ``dst``.

    ``to="megatron"``: a checkpoint at TP=``tp`` (default: the source's TP, 1 for PEFT);
    from a megatron-lora source this reshards. ``to="peft"``: a PEFT LoRA directory.
    ``facts`` (the base model's, :func:`base_facts`) is required for a PEFT source and
    checked against a megatron-lora source. ``check(tmp)`` runs on the finished output
    before it is renamed to ``dst`` (``--verify``): if it raises, nothing is written.

    An X-LoRA ``src`` becomes our X-LoRA checkpoint (``to="megatron"``, experts as
    sub-checkpoints) or the intended PEFT X-LoRA layout (``to="peft"``, from any layout);
    ``confine_experts`` refuses experts outside ``src``.

    A mixture of experts' expert and router LoRAs go to PEFT in ``moe_layout``
    (``layout.MOE_LAYOUTS``): transformers 5's fused ``target_parameters`` (default) or
    transformers 4's per-expert modules named by ``expert_names`` (:func:`base_expert_names`).
    A PEFT source may hold either.
    """
    if to not in ("peft", "megatron"):
        raise ValueError(f"to={to!r}: expected 'peft' or 'megatron'")
    if tp is not None:
        check_positive_int("--tp", tp)
    check_destination(dst, overwrite)  # before reading anything
    fmt = detect(src)
    if fmt.is_xlora:
        if check is not None:
            raise ValueError(f"{src} is an X-LoRA directory: only LoRA conversions can be checked")
        return _convert_xlora(src, dst, to, facts, tp, overwrite, confine_experts)
    if fmt is Format.PEFT_LORA and facts is None:
        raise ValueError(f"{src} is a PEFT adapter: the base model's facts (--base) are needed")
    if to == "peft" and fmt is Format.PEFT_LORA:
        raise ValueError(f"{src} is already a PEFT LoRA directory")
    if to == "megatron" and facts is not None and tp is not None:
        facts.check_tp(tp)  # before reading anything
    reader, config = open_adapter(src, facts)
    facts = facts or reader.facts
    if to == "megatron":
        tp = tp or reader.saved_tp
        ckpt_config, ranks = megatron_plan(reader, config, facts, tp)
        files = [(j, plans) for j, plans in enumerate(ranks)]
    else:
        peft_config, plans = peft_plan(reader, config, moe_layout, expert_names)
        files = [(None, plans)]
    with atomic_directory(dst, overwrite) as tmp:
        with tqdm(total=sum(len(p) for _, p in files), desc=f"{Path(src).name} -> {to}", unit="tensor",
                  file=sys.stderr, disable=not progress) as bar:
            for j, plans in files:
                write_safetensors(shard_file(tmp, j) if j is not None else tmp / WEIGHTS_NAME, plans, bar)
        if to == "megatron":
            write_config(tmp, ckpt_config)
        else:
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        if check is not None:
            check(tmp)
    return Path(dst)


def _convert_xlora(
    src: str | Path, dst: str | Path, to: str, facts: Optional[ModelFacts], tp: Optional[int], overwrite: bool,
    confine_experts: bool,
) -> Path:
    bundle = read_xlora(src, confine_experts)
    if to == "peft":
        return write_peft_xlora(bundle, dst, overwrite=overwrite, facts=facts)
    return write_megatron_xlora(bundle, dst, tp or bundle.saved_tp, facts=facts, overwrite=overwrite)


def describe(directory: str | Path, confine_experts: bool = False) -> dict:
    """Format, kind, checkpoint version (None for PEFT), TP size, adapted modules by parallel
    style, tied modules (-> the module whose adapter they use), targets, per-segment layers,
    ranks and alphas, and parameter count. Mixture-of-experts LoRAs are listed apart (``experts``: per segment, layer -> adapted experts, ranks
    and alphas; a PEFT source's ``moe_layout``).

    For an X-LoRA directory: its layout, the classifier's options and shapes,
    n_layers x n_experts, each expert's description and where it lives (``path``, resolved;
    ``inside`` the directory or not), and parameter counts. ``confine_experts`` refuses
    experts outside the directory.
    """
    fmt = detect(directory)
    if fmt.is_xlora:
        return _describe_xlora(directory, confine_experts)
    reader, config = open_adapter(directory)
    segments: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    params = 0
    for key in reader.keys():
        params += math.prod(reader.full_shape(key))
        module, factor, seg = split_key(key)
        if factor != "lora_A":
            continue
        moe = parse_moe_module(module)
        if moe is not None:  # per segment: layer -> adapted experts (the router: none)
            info = experts.setdefault(seg, {"layers": {}, "r": set(), "lora_alpha": set()})
            info["layers"].setdefault(moe.layer, []).extend([] if moe.expert is None else [moe.expert])
            info["r"].add(reader.full_shape(key)[0])
            info["lora_alpha"].add(config.rank_alpha(segment_name(config, key))[1])
            continue
        known = layout_module(module)
        layer = known[0] if known is not None else config.layer_index(module)
        info = segments.setdefault(seg, {"layers": [], "r": set(), "lora_alpha": set()})
        if layer is not None:
            info["layers"].append(layer)
        info["r"].add(reader.full_shape(key)[0])
        info["lora_alpha"].add(config.rank_alpha(segment_name(config, key))[1])
    for module, source in tied_modules(reader.modules).items():
        # A tied module: the source's rank, its own (PEFT: lm_head's) alpha.
        info = segments.setdefault(next(iter(reader.modules[module]["segments"])), {"layers": [], "r": set(), "lora_alpha": set()})
        info["r"].add(reader.full_shape(module_key(source, "lora_A", next(iter(reader.modules[source]["segments"]))))[0])
        info["lora_alpha"].add(config.rank_alpha(LM_HEAD)[1])
    styles = [m["parallel"] for m in reader.modules.values()]
    order = {s: i for i, s in enumerate(HF_PROJECTIONS)}
    return {
        "format": fmt.value,
        "kind": "lora",
        "version": getattr(reader, "config", {}).get("version"),
        "tp_size": reader.saved_tp,
        "modules": {"column": styles.count("column"), "row": styles.count("row"), "replicated": styles.count("replicated")},
        "moe_layout": getattr(reader, "moe_layout", None),
        "tied": tied_modules(reader.modules),
        "target_modules": config.target_modules,
        "target_parameters": config.target_parameters,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "segments": {
            s: {"layers": sorted(v["layers"]), "r": sorted(v["r"]), "lora_alpha": sorted(v["lora_alpha"])}
            for s, v in sorted(segments.items(), key=lambda kv: order.get(kv[0], len(order)))
        },
        "experts": {
            s: {"layers": {i: sorted(e) for i, e in sorted(v["layers"].items())}, "r": sorted(v["r"]),
                "lora_alpha": sorted(v["lora_alpha"])}
            for s, v in experts.items()
        },
        "parameters": params,
    }


def _describe_xlora(directory: str | Path, confine_experts: bool) -> dict:
    bundle = read_xlora(directory, confine_experts)
    n_layers = check_bundle(bundle)
    experts = {name: {"path": str(Path(d).resolve()), "inside": expert_inside(directory, d), **describe(d)}
               for name, d in bundle.experts.items()}
    options = {k: v for k, v in bundle.config.to_dict().items() if k not in ("peft_type", "adapters")}
    return {
        "format": bundle.layout,
        "kind": "xlora",
        "tp_size": bundle.saved_tp,
        "n_layers": n_layers,
        "n_experts": len(experts),
        "classifier": {**options, "shapes": [list(w.shape) for w, _ in bundle.classifier]},
        "experts": experts,
        "parameters": {
            "classifier": sum(w.numel() + b.numel() for w, b in bundle.classifier),
            "experts": sum(e["parameters"] for e in experts.values()),
        },
    }
