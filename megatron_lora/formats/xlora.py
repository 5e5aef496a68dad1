"""X-LoRA directory formats: PEFT's, the original xlora package's, and ours.

Every reader returns an :class:`XLoraBundle` (config, full classifier tensors, expert
directories); every writer takes one. Expert i is the i-th entry of ``config.adapters``.

**PEFT X-LoRA, intended layout** (what :func:`write_peft_xlora` writes)::

    adapter_config.json         peft_type "XLORA", PEFT's XLoraConfig fields,
                                adapters {"0": "0", "1": "1", ...}
    adapter_model.safetensors   base_model.internal_xlora_classifier.layers.{k}.weight/bias
    0/, 1/, ...                 each expert as a PEFT LoRA directory

``k`` is the nn.Sequential index of each linear (depth 1: 0; depth d with dropout p > 0:
0, 3, 6, ...; with p = 0: 0, 2, 4, ...). Experts are named "0".."n-1" because peft 0.21.2
silently drops experts named otherwise. ``PeftModel.from_pretrained(base, dir)`` reads the
expert paths from ``adapters`` and resolves them against the WORKING DIRECTORY, so run it
from inside ``dir`` (or rewrite the paths); this reader resolves relative paths against
``dir`` itself.

**PEFT X-LoRA as peft 0.21.2's own save writes it**: a classifier entry whose index k
equals an expert name sits in that expert's file as ``...layers.weight`` (".k" dropped) and
is missing from the top-level file; the expert subfolders also hold a mixture of base and
other experts' tensors, not the expert. The reader takes such entries from the expert
files and such experts from the paths in ``adapters``.

**Original xlora package**: ``xlora_config.json`` + ``xlora_classifier.safetensors``
(``inner.{i}.weight/bias``, ``last.weight/bias``) + one subfolder per expert. Its
``use_bias: false`` becomes zero biases; ``enable_relu_and_dropout: false`` with depth >= 2
(no ReLU) cannot be expressed and is refused.

**Megatron X-LoRA checkpoint** (ours, ``kind: "xlora"``)::

    adapter_config.json         {"format": "megatron-lora", "version": 1, "kind": "xlora",
                                 "tp_size": N, "model": {...ModelFacts...}, "n_layers": L,
                                 "xlora_config": {...PEFT field names...,
                                                  "adapters": {name: "experts/<i>"}}}
    tp_rank_{j:02d}.safetensors rank j's classifier shards, keys
                                xlora_classifier.linears.{k}.weight / .bias (k = linear index)
    experts/<i>/                expert i as a megatron-lora LoRA checkpoint at the same TP

Classifier shards follow ``megatron_lora.parallel.xlora_classifier`` (counted from the last linear:
row-parallel, column-parallel, ...). Writers go through ``outputs.atomic_directory``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from megatron_lora.formats.checkpoint import (
    CONFIG_NAME,
    ShardReader,
    checkpoint_config,
    open_shard,
    parse_key,
    read_config,
    split_key,
    write_checkpoint,
    write_config,
    write_shard,
)
from megatron_lora.formats.detect import XLORA_PACKAGE_CONFIG, Format, detect
from megatron_lora.config import XLoraConfig
from megatron_lora.formats.files import open_safetensors, read_json, read_safetensors
from megatron_lora.hf.layout import PEFT_PREFIX, ModelFacts, parse_moe_module, segment_projection
from megatron_lora.formats.outputs import atomic_directory
from megatron_lora.formats.peft import (
    WEIGHTS_NAME,
    megatron_to_peft,
    open_adapter,
    peft_to_megatron,
    reshard,
)
from megatron_lora.parallel.xlora_classifier import check_tp, linear_shapes, linear_styles, shard_linear, unshard_linear

PEFT_CLASSIFIER = "base_model.internal_xlora_classifier.layers"
XLORA_PACKAGE_WEIGHTS = "xlora_classifier.safetensors"
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

Linears = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class XLoraBundle:
    """An X-LoRA adapter in memory: config, full (TP=1) classifier linears, expert dirs."""

    config: XLoraConfig
    classifier: Linears
    experts: dict[str, Path] = field(default_factory=dict)
    #: The layout it was read from: "peft-xlora" (intended), "peft-0.21.2-save",
    #: "xlora-package" or "megatron-xlora" (None: built in memory).
    layout: Optional[str] = None
    #: TP size of a Megatron X-LoRA checkpoint (1 otherwise).
    saved_tp: int = 1


def sequential_indices(config: XLoraConfig) -> list[int]:
    """nn.Sequential index of each linear in PEFT's classifier."""
    stride = 3 if config.xlora_dropout_p > 0 else 2
    return [k * stride for k in range(config.xlora_depth)]


def megatron_key(k: int, part: str) -> str:
    return f"xlora_classifier.linears.{k}.{part}"


# -- readers -------------------------------------------------------------------------------------


def read_xlora(directory: str | Path, confine_experts: bool = False) -> XLoraBundle:
    """Read an X-LoRA directory in any of the layouts of this module.

    Expert paths in the config may point anywhere (as PEFT allows); ``confine_experts``
    refuses those that resolve outside ``directory``.
    """
    fmt = detect(directory)
    if not fmt.is_xlora:
        raise ValueError(f"{directory} holds a LoRA adapter ({fmt.value}), not an X-LoRA one")
    reader = {Format.MEGATRON_XLORA: _read_megatron, Format.PEFT_XLORA: _read_peft,
              Format.XLORA_PACKAGE: _read_xlora_package}
    bundle = reader[fmt](Path(directory))
    if confine_experts:
        for name, path in bundle.experts.items():
            if not expert_inside(directory, path):
                raise ValueError(f"{directory}: expert {name!r} is at {Path(path).resolve()}, outside the "
                                 "directory (refused by --confine-experts)")
    return bundle


def expert_inside(directory: str | Path, expert: str | Path) -> bool:
    """Whether an expert directory resolves (symbolic links followed) inside ``directory``."""
    root, path = Path(directory).resolve(), Path(expert).resolve()
    return path == root or root in path.parents


def _expert_dir(directory: Path, name: str, path: str) -> Path:
    """An expert's LoRA directory: the subfolder named for it if it holds the expert alone,
    else ``path`` (relative paths resolve against ``directory``)."""
    sub = directory / name
    weights = sub / WEIGHTS_NAME
    if weights.is_file():
        with open_safetensors(weights) as f:
            # PEFT's save writes base, classifier and other experts' tensors under
            # "base_model.lora_model."; a real expert holds LoRA factors only.
            clean = all(k.startswith(PEFT_PREFIX) and k.endswith(_FACTOR_SUFFIXES) for k in f.keys())
        if clean:
            return sub
    candidate = Path(path) if Path(path).is_absolute() else directory / path
    if not candidate.is_dir():
        raise FileNotFoundError(
            f"{directory}: expert {name!r} is neither a clean subfolder {sub} nor at {candidate}"
        )
    return candidate


def _xlora_config(d: dict, path: Path) -> XLoraConfig:
    try:
        config = XLoraConfig.from_dict(d)
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(config.adapters, dict) or not config.adapters:
        raise ValueError(f"{path}: adapters must name at least one expert, got {d.get('adapters')!r}")
    if config.top_k_lora is not None and config.top_k_lora > len(config.adapters):
        raise ValueError(f"{path}: top_k_lora={config.top_k_lora} exceeds the {len(config.adapters)} experts")
    return config


def _read_peft(directory: Path) -> XLoraBundle:
    config = _xlora_config(read_json(directory / CONFIG_NAME), directory / CONFIG_NAME)
    top = read_safetensors(directory / WEIGHTS_NAME)
    classifier, layout = [], "peft-xlora"
    for k in sequential_indices(config):
        parts = []
        for part in ("weight", "bias"):
            key = f"{PEFT_CLASSIFIER}.{k}.{part}"
            if key not in top:  # peft 0.21.2's save puts it into expert k's file, ".k" dropped
                misplaced = directory / str(k) / WEIGHTS_NAME
                moved = read_safetensors(misplaced) if misplaced.is_file() else {}
                if f"{PEFT_CLASSIFIER}.{part}" not in moved:
                    raise ValueError(f"{directory}: classifier tensor {key!r} is missing")
                top[key], layout = moved[f"{PEFT_CLASSIFIER}.{part}"], "peft-0.21.2-save"
            parts.append(top[key])
        classifier.append(tuple(parts))
    experts = {name: _expert_dir(directory, name, path) for name, path in config.adapters.items()}
    return XLoraBundle(config, classifier, experts, layout)


#: Fields of the original package's config that do not change the per-token math.
_XLORA_PACKAGE_IGNORED = {"device", "stop_token_id", "model_type", "use_bias", "enable_relu_and_dropout"}


def _read_xlora_package(directory: Path) -> XLoraBundle:
    raw = read_json(directory / XLORA_PACKAGE_CONFIG)
    if raw.get("use_mean_pool"):
        raise ValueError(f"{directory}: use_mean_pool=True (one scaling per sequence) is not supported")
    depth = raw.get("xlora_depth", 1)
    relu = raw.get("enable_relu_and_dropout", False)
    if depth >= 2 and not relu:
        raise ValueError(
            f"{directory}: enable_relu_and_dropout=False with xlora_depth={depth} (linears without "
            "ReLU) cannot be expressed as a PEFT X-LoRA classifier"
        )
    fields = {k: v for k, v in raw.items() if k not in _XLORA_PACKAGE_IGNORED | {"use_mean_pool"}}
    config = _xlora_config(fields, directory / XLORA_PACKAGE_CONFIG)
    tensors = read_safetensors(directory / XLORA_PACKAGE_WEIGHTS)
    # inner = [Linear, ReLU, Dropout] per hidden linear (the Dropout exists even at p = 0).
    names = [f"inner.{3 * k}" for k in range(depth - 1)] + ["last"]
    classifier = []
    for name in names:
        if f"{name}.weight" not in tensors:
            raise ValueError(f"{directory / XLORA_PACKAGE_WEIGHTS}: {name}.weight is missing")
        w = tensors[f"{name}.weight"]
        b = tensors.get(f"{name}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
        classifier.append((w, b))
    experts = {name: _expert_dir(directory, name, path) for name, path in config.adapters.items()}
    return XLoraBundle(config, classifier, experts, "xlora-package")


def _read_megatron(directory: Path) -> XLoraBundle:
    cfg = read_config(directory)
    config = _xlora_config(cfg["xlora_config"], directory / CONFIG_NAME)
    files = [open_shard(directory, j) for j in range(cfg["tp_size"])]
    classifier = []
    for k, style in enumerate(linear_styles(config.xlora_depth)):
        try:
            ws = [f.get_tensor(megatron_key(k, "weight")) for f in files]
            bs = [f.get_tensor(megatron_key(k, "bias")) for f in files]
        except SafetensorError as e:
            raise ValueError(f"{directory}: classifier linear {k} is missing or unreadable: {e}") from None
        classifier.append(unshard_linear(ws, bs, style))
    experts = {name: directory / path for name, path in config.adapters.items()}
    return XLoraBundle(config, classifier, experts, "megatron-xlora", cfg["tp_size"])


# -- checks ----------------------------------------------------------------------------------------


def check_expert_config(directory, reader, config) -> None:
    """Refuse an expert X-LoRA cannot mix: a DoRA adapter (PEFT's X-LoRA mixes plain LoRA
    terms), and one on an MoE expert or router (the scalings cover the projections of the
    LLaMA-family layout only)."""
    if config.use_dora:
        raise ValueError(f"{directory}: an X-LoRA expert with use_dora=True is not supported")
    moe = next((m for m in (split_key(k)[0] for k in reader.keys()) if parse_moe_module(m) is not None), None)
    if moe is not None:
        raise ValueError(f"{directory}: an X-LoRA expert adapting MoE experts or routers ({moe}) is not supported")


def expert_layers(expert_dirs: list[Path], facts: Optional[ModelFacts] = None) -> int:
    """n_layers: the (global layer, HF projection) pairs any expert adapts."""
    adapted = set()
    for d in expert_dirs:
        reader, config = open_adapter(d, facts)
        check_expert_config(d, reader, config)
        efacts = facts or reader.facts
        for key in reader.keys():
            layer, module, _, seg = parse_key(key)
            adapted.add((layer, segment_projection(module, seg, efacts)))
    return len(adapted)


def check_bundle(bundle: XLoraBundle, facts: Optional[ModelFacts] = None) -> int:
    """Check the bundle's pieces fit together; return n_layers.

    Refuses experts whose names or count disagree with the config, experts made for another
    base (with ``facts``), and a classifier whose shapes do not fit n_layers x n_experts.
    """
    config = bundle.config
    if list(bundle.experts) != list(config.adapters):
        raise ValueError(f"experts {list(bundle.experts)} disagree with the config's adapters {list(config.adapters)}")
    n_layers = expert_layers(list(bundle.experts.values()), facts)
    n = len(bundle.experts)
    out = n * (n_layers if config.layerwise_scalings else 1)
    hidden = config.hidden_size or bundle.classifier[0][0].shape[1]
    expected = linear_shapes(config.xlora_depth, hidden, config.xlora_size, out)
    got = [(tuple(w.shape), tuple(b.shape)) for w, b in bundle.classifier]
    want = [((o, i), (o,)) for i, o in expected]
    if got != want:
        raise ValueError(
            f"classifier shapes {got} do not fit n_layers={n_layers} x n_experts={n} "
            f"(layerwise_scalings={config.layerwise_scalings}, xlora_depth={config.xlora_depth}, "
            f"hidden_size={hidden}, xlora_size={config.xlora_size}): expected {want}"
        )
    return n_layers


# -- writers ---------------------------------------------------------------------------------------


def _peft_config_dict(config: XLoraConfig, names: list[str]) -> dict:
    d = config.to_dict()
    d.update(adapters={n: n for n in names}, task_type="CAUSAL_LM", base_model_name_or_path=None,
             inference_mode=True)
    return d


def write_peft_xlora(
    bundle: XLoraBundle, directory: str | Path, overwrite: bool = False, facts: Optional[ModelFacts] = None
) -> Path:
    """Write the intended PEFT X-LoRA layout (experts renamed "0".."n-1", as PEFT needs).

    With ``facts`` (the base model's), experts made for another model are refused.
    """
    check_bundle(bundle, facts)
    names = [str(i) for i in range(len(bundle.experts))]
    with atomic_directory(directory, overwrite) as tmp:
        idx = sequential_indices(bundle.config)
        tensors = {}
        for k, (w, b) in zip(idx, bundle.classifier):
            tensors[f"{PEFT_CLASSIFIER}.{k}.weight"] = w.contiguous()
            tensors[f"{PEFT_CLASSIFIER}.{k}.bias"] = b.contiguous()
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        for name, src in zip(names, bundle.experts.values()):
            _write_peft_expert(Path(src), tmp / name)
        (tmp / CONFIG_NAME).write_text(json.dumps(_peft_config_dict(bundle.config, names), indent=2) + "\n")
    return Path(directory)


def _write_peft_expert(src: Path, dst: Path) -> None:
    reader, _ = open_adapter(src)
    if isinstance(reader, ShardReader):
        config, tensors = megatron_to_peft(src)
        dst.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / WEIGHTS_NAME))
        (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    else:  # a PEFT directory: copy its two files byte for byte
        dst.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(src / name, dst / name)


def write_megatron_xlora(
    bundle: XLoraBundle, directory: str | Path, tp: int, facts: Optional[ModelFacts] = None, overwrite: bool = False
) -> Path:
    """Write our X-LoRA checkpoint at TP=``tp``.

    ``facts`` (the base model's) is needed when an expert is a PEFT directory; experts that
    are megatron-lora checkpoints carry their own (and must agree with ``facts``).
    """
    n_layers = check_bundle(bundle, facts)
    check_tp(bundle.config.xlora_depth, bundle.classifier[0][0].shape[1], bundle.config.xlora_size, tp)
    if facts is not None:
        facts.check_tp(tp)
    peft_experts = [name for name, d in bundle.experts.items() if detect(d) is Format.PEFT_LORA]
    if peft_experts and facts is None:
        raise ValueError(
            f"experts {peft_experts} are PEFT LoRA directories: the base model's facts (--base) are needed"
        )
    with atomic_directory(directory, overwrite) as tmp:
        styles = linear_styles(bundle.config.xlora_depth)
        for j in range(tp):
            shard = {}
            for k, ((w, b), style) in enumerate(zip(bundle.classifier, styles)):
                shard[megatron_key(k, "weight")], shard[megatron_key(k, "bias")] = shard_linear(w, b, style, j, tp)
            write_shard(tmp, j, shard)
        names = [str(i) for i in range(len(bundle.experts))]
        (tmp / "experts").mkdir()
        for name, src in zip(names, bundle.experts.values()):
            reader, _ = open_adapter(src, facts)
            if isinstance(reader, ShardReader):
                facts = facts or reader.facts
                cfg, ranks = reshard(src, tp)
            else:
                cfg, ranks = peft_to_megatron(src, facts, tp)
            write_checkpoint(tmp / "experts" / name, cfg, ranks)
        config = bundle.config.to_dict()
        config["adapters"] = {bundle_name: f"experts/{i}" for i, bundle_name in enumerate(bundle.experts)}
        full = checkpoint_config("xlora", tp, facts, config, key="xlora_config")
        write_config(tmp, {**full, "n_layers": n_layers})
    return Path(directory)
