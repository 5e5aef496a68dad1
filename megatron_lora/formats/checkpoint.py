"""Our Megatron adapter checkpoint: one safetensors file per TP rank (format version 2).

Directory layout::

    adapter_config.json       {"format": "megatron-lora", "version": 2, "kind": "lora",
                               "tp_size": N, "lora_config": {...PEFT field names...},
                               "modules": {"<module>": {"parallel": "column" | "row" | "replicated",
                                           "segments": {"<segment>": {"blocks": 1}}}},
                               "model": {...ModelFacts...}   (where the LLaMA-family
                                                              layout is adapted)}
    tp_rank_00.safetensors    rank 0's tensors, keyed <module>.lora_A.<segment> and
    tp_rank_01.safetensors    <module>.lora_B.<segment>

``<module>`` is the adapted module's dotted name in the model with GLOBAL layer indices
(``decoder.layers.{i}.self_attention.linear_qkv``, ``encoder.layers.1.linear_fc1``,
``output_layer`` ...). ``<segment>`` is an HF projection (``q_proj`` ...: per-projection
LoRA on a fused module of the LLaMA-family layout) or the module's last name component (one
LoRA over the whole module, shared A on a fused one). ``parallel`` says how the factors are
split over TP (column: B by rows, A replicated; row: A by columns, B replicated;
replicated: neither) and ``blocks`` how a split B's rows are chunked (2: megatron-core's
gated ``[gate_j; up_j]``). Each rank's tensors have the shape that rank holds; pipeline
stages are merged.

Mixture of experts (megatron-core's SequentialMLP experts and TopKRouter), GLOBAL expert
index ``E`` (expert-parallel rank x experts per rank + local index)::

    decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.lora_A.linear_fc1   one LoRA over
                                                                                  [gate; up] (blocks 2)
    decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.lora_A.gate_proj    per projection
    decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.lora_A.up_proj      (Mixtral's w1, w3)
    decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.lora_A.linear_fc2   or .down_proj (w2)
    decoder.layers.{L}.mlp.router.lora_A.router                                   parallel "replicated":
                                                                                  A [r, hidden], B [experts, r]

(and the same with ``lora_B``). An expert's factors are stored like a dense module's of
its style (fc1 column, fc2 row), split over the files' ``tp_size`` whatever expert-TP and
expert-parallel sizes the model had: every file holds every expert, and a reader slices
them again for its own expert-TP size and keeps its expert-parallel rank's experts.
``lora_config.target_parameters`` (PEFT's, e.g. ``["gate_up_proj", "down_proj", "gate.weight"]``)
adapts a module whole (segment ``linear_fc1`` / ``linear_fc2`` / ``router``).

Version 1 (still read) had the same keys for the four modules of the LLaMA-family layout
only, no ``modules`` table (it follows from the module names) and always ``model``.
Writers go through :func:`write_checkpoint` (``outputs.atomic_directory``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from megatron_lora.config import LoraConfig
from megatron_lora.errors import check_positive_int
from megatron_lora.formats.detect import CONFIG_NAME, MEGATRON_FORMAT
from megatron_lora.formats.files import open_safetensors, read_json
from megatron_lora.hf.layout import (
    LAYER_INDEX,
    MODULE_PATH,
    EMBEDDING,
    EMBEDDING_PATH,
    OUTPUT_LAYER,
    ModelFacts,
    factor_dim,
    factor_split,
    hf_module_name,
    megatron_module_name,
    module_style,
    padded_vocab_size,
    parse_moe_module,
    vocab_rows,
)
from megatron_lora.formats.outputs import atomic_directory
from megatron_lora.parallel.lora_layers import shard_rows, unshard_rows


VERSION = 2
#: Versions the readers accept.
READ_VERSIONS = (1, 2)
_KEY = re.compile(r"(?P<module>\w+(?:\.\w+)*?)\.(?P<factor>lora_A|lora_B)\.(?P<segment>\w+)", re.ASCII)
_LAYOUT_MODULE = re.compile(rf"decoder\.layers\.(?P<layer>{LAYER_INDEX})\.(?P<path>\w+\.\w+)", re.ASCII)
_MODULE_OF_PATH = {v: k for k, v in MODULE_PATH.items()}

#: A module's entry in the ``modules`` table: {"parallel": ..., "segments": {seg: {"blocks": n}}}.
ModuleTable = dict[str, dict]
#: How a module's factors are split over TP (``layout.factor_dim``).
PARALLEL_STYLES = ("column", "row", "replicated")


def shard_file(directory: str | Path, tp_rank: int) -> Path:
    return Path(directory) / f"tp_rank_{tp_rank:02d}.safetensors"


def split_key(key: str) -> tuple[str, str, str]:
    """(module name, factor, segment) of a checkpoint key.

    Numbered components are ASCII digits without leading zeros, so that no two spellings
    (``1`` and ``01``) name one module.
    """
    m = _KEY.fullmatch(key)
    if m is None or any(p.isdigit() and not re.fullmatch(LAYER_INDEX, p) for p in m["module"].split(".")):
        raise ValueError(f"not a megatron-lora adapter key: {key!r}")
    return m["module"], m["factor"], m["segment"]


def module_key(module: str, factor: str, segment: str) -> str:
    return f"{module}.{factor}.{segment}"


def layout_module(module: str) -> Optional[tuple[Optional[int], str]]:
    """(global layer, Megatron module) of a module name of the LLaMA-family layout (layer None
    for the output layer), else None."""
    if module == OUTPUT_LAYER:
        return None, OUTPUT_LAYER
    if module == EMBEDDING_PATH:
        return None, EMBEDDING
    m = _LAYOUT_MODULE.fullmatch(module)
    if m is None or m["path"] not in _MODULE_OF_PATH:
        return None
    return int(m["layer"]), _MODULE_OF_PATH[m["path"]]


def parse_key(key: str) -> tuple[int, str, str, str]:
    """(global layer, Megatron module, factor, segment) of a key of the LLaMA-family layout."""
    module, factor, segment = split_key(key)
    known = layout_module(module)
    if known is None:
        raise ValueError(f"not a megatron-lora adapter key of the LLaMA-family layout: {key!r}")
    return known[0], known[1], factor, segment


def make_key(layer: int, module: str, factor: str, segment: str) -> str:
    return module_key(megatron_module_name(layer, module), factor, segment)


def layout_module_table(keys: Iterable[str], facts: Optional[ModelFacts]) -> ModuleTable:
    """The ``modules`` table of keys of the LLaMA-family layout (a version-1 checkpoint, a
    PEFT adapter)."""
    table: ModuleTable = {}
    for key in keys:
        layer, module, _, seg = parse_key(key)
        entry = table.setdefault(megatron_module_name(layer, module), {"parallel": module_style(module), "segments": {}})
        entry["segments"][seg] = {"blocks": factor_split(module, "lora_B", seg, facts)[1]}
    return table


def check_module_table(table, keys: Iterable[str], where: str) -> ModuleTable:
    """Refuse a ``modules`` table that is malformed or does not describe exactly ``keys``."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: modules is {'missing' if table is None else 'not an object'}")
    for name, entry in table.items():
        ok = isinstance(entry, dict) and entry.get("parallel") in PARALLEL_STYLES and isinstance(entry.get("segments"), dict)
        ok = ok and all(isinstance(v, dict) and v.get("blocks") in (1, 2) for v in entry["segments"].values())
        if not ok:
            raise ValueError(f"{where}: modules[{name!r}] is not {{'parallel': 'column'|'row'|'replicated', "
                             "'segments': {name: {'blocks': 1|2}}}")
    described = {module_key(n, f, s) for n, e in table.items() for s in e["segments"] for f in ("lora_A", "lora_B")}
    keys = set(keys)
    if described != keys:
        odd = sorted(described ^ keys)
        raise ValueError(f"{where}: the modules table and the tensors disagree on {odd[:3]}")
    return table


def key_split(table: ModuleTable, key: str) -> tuple[Optional[int], int]:
    """(dim split over TP or None if replicated, blocks) of ``key`` by the ``modules`` table."""
    module, factor, seg = split_key(key)
    entry = table.get(module)
    if entry is None or seg not in entry["segments"]:
        raise ValueError(f"{key}: the modules table has no segment {seg!r} of {module}")
    dim = factor_dim(entry["parallel"], factor)
    return dim, entry["segments"][seg]["blocks"] if dim == 0 else 1


def key_vocab_rows(key: str, facts: Optional[ModelFacts]) -> Optional[int]:
    """The real rows of a factor split along the padded vocabulary (``layout.vocab_rows``)."""
    module, factor, _ = split_key(key)
    known = layout_module(module)
    return vocab_rows(known[1], factor, facts) if known is not None and facts is not None else None


def local_shape(full_shape: list[int], dim: Optional[int], tp: int, rows: Optional[int]) -> list[int]:
    """The shape a TP rank holds of a factor of ``full_shape`` (``rows``: vocabulary rows)."""
    shape = list(full_shape)
    if dim is not None:
        shape[dim] = (padded_vocab_size(rows, tp) if rows is not None else shape[dim]) // tp
    return shape


def local_part(full: torch.Tensor, dim: int, blocks: int, tp_rank: int, tp: int, rows: Optional[int]) -> torch.Tensor:
    """Rank ``tp_rank``'s part of a full factor split along ``dim``; vocabulary rows are first
    padded with zeros to a multiple of ``tp``, as the model holds them."""
    if rows is not None and padded_vocab_size(rows, tp) > rows:
        pad = list(full.shape)
        pad[dim] = padded_vocab_size(rows, tp) - rows
        full = torch.cat([full, full.new_zeros(pad)], dim)
    return shard_rows(full, blocks, tp_rank, tp) if dim == 0 else full.chunk(tp, dim)[tp_rank].contiguous()


def adapted_name(key: str) -> str:
    """The name matching and rank_pattern / alpha_pattern see for the segment of ``key``: the
    HF name of a projection segment, else the module's own name."""
    module, _, seg = split_key(key)
    known = layout_module(module)
    if known is not None and seg != known[1]:
        return hf_module_name(known[0], seg)
    return module


def read_config(directory: str | Path) -> dict:
    """Read and check adapter_config.json of a megatron-lora checkpoint.

    Every field the readers use is checked here, so a damaged config fails with one error
    naming the file rather than a KeyError later.
    """
    path = Path(directory) / CONFIG_NAME
    cfg = read_json(path)
    if cfg.get("format") != MEGATRON_FORMAT:
        raise ValueError(f"{directory} is not a megatron-lora checkpoint (format={cfg.get('format')!r})")
    if cfg.get("version") not in READ_VERSIONS:
        raise ValueError(f"{directory}: unsupported megatron-lora checkpoint version {cfg.get('version')!r}")
    try:
        check_positive_int("tp_size", cfg.get("tp_size"))
        kind = cfg.get("kind")
        if kind not in ("lora", "xlora"):
            raise ValueError(f"kind={kind!r} is not 'lora' or 'xlora'")
        key = f"{kind}_config"
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"{key} is {'missing' if key not in cfg else 'not an object'}")
        if cfg["version"] == 1 or "model" in cfg:  # version 2 has facts for GPT models only
            ModelFacts.from_dict(cfg.get("model"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    for i in range(cfg["tp_size"]):
        if not shard_file(directory, i).is_file():
            raise FileNotFoundError(f"{shard_file(directory, i)} is missing")
    return cfg


def open_shard(directory: str | Path, tp_rank: int):
    """safe_open a rank file, turning a corrupt or truncated file into a clear error."""
    return open_safetensors(shard_file(directory, tp_rank))


def check_against_config(keys: Iterable[str], rank_of: Callable[[str], int], config: LoraConfig, source: str,
                         facts: Optional[ModelFacts] = None) -> None:
    """Refuse tensors that PEFT would not load or apply as the config says.

    Each adapted module (HF name of a per-projection segment, else the module's own name)
    must be one the config's targets adapt, and its rank (``rank_of`` its lora_A key) must
    be its effective rank (``rank_pattern``, then ``r``, whose default is PEFT's 8). With
    ``facts``, every module of the LLaMA-family layout the config adapts must have tensors.
    """
    adapted, moe_layers = set(), set()
    for key in keys:
        module, factor, seg = split_key(key)
        if factor != "lora_A":
            continue
        moe = parse_moe_module(module)
        if moe is not None:
            moe_layers.add(moe.layer)
            name = config.moe_segment_name(moe, seg)
            ok = name is not None
        else:
            name = adapted_name(key)
            ok = config.matches(name, any_linear=layout_module(module) is None)
        if not ok:
            name = name or f"segment {seg} of {module}"
            raise ValueError(
                f"{source}: holds tensors for {name}, which the config does not adapt (target_modules="
                f"{config.target_modules!r}, target_parameters={config.target_parameters!r}, layers_to_transform={config.layers_to_transform!r}, "
                f"exclude_modules={config.exclude_modules!r}): PEFT would not apply them"
            )
        r, want = rank_of(key), config.rank_alpha(name)[0]
        if r != want:
            raise ValueError(f"{source}: {name} has rank {r}, but the config gives it r={want} "
                             "(rank_pattern, then r): its scaling would be wrong")
        adapted.add(name)
    if not adapted:
        raise ValueError(f"{source} holds no LoRA tensors")
    if facts is None:
        return
    expected = set()
    # An MoE layer has experts where a dense layer has linear_fc1 / linear_fc2.
    layout = [(layer, module) for layer in range(facts.num_layers) for module in MODULE_PATH
              if not (layer in moe_layers and module.startswith("linear_fc"))] + [(None, OUTPUT_LAYER), (None, EMBEDDING)]
    for layer, module in layout:
        names = [megatron_module_name(layer, module)] + [hf_module_name(layer, p) for p in facts.projections(module)]
        expected.update(n for n in names if config.matches(n, layer))
    missing = sorted(expected - adapted)
    if missing:
        raise ValueError(f"{source}: the config adapts {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                         f"but no tensors for {'them' if len(missing) > 1 else 'it'} are present")


class ShardReader:
    """Reads tensors of a checkpoint saved at any TP size, resharded to ``tp_size``.

    Every rank file's tensors are checked against ``tp_size``, the ``modules`` table and
    (where present) the model facts of the config (headers only) and, for a LoRA checkpoint,
    against its ``lora_config``.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config = read_config(directory)
        self.facts = ModelFacts.from_dict(self.config["model"]) if "model" in self.config else None
        self.saved_tp = self.config["tp_size"]
        self._files = [open_shard(directory, j) for j in range(self.saved_tp)]
        self.lora_config: Optional[LoraConfig] = None
        self.modules: ModuleTable = {}
        if self.config["kind"] == "lora":
            where = str(self.directory / CONFIG_NAME)
            try:
                self.lora_config = LoraConfig.from_dict(self.config["lora_config"])
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: lora_config: {e}") from None
            for key in self._files[0].keys():
                split_key(key)  # every key well-formed before it is looked up
            if self.facts is None and any(layout_module(split_key(k)[0]) for k in self.keys()):
                raise ValueError(f"{where}: model is missing (the modules of the LLaMA-family layout need its facts)")
            if self.config["version"] == 1:
                self.modules = layout_module_table(self.keys(), self.facts)
            else:
                self.modules = check_module_table(self.config.get("modules"), self.keys(), where)
            self._check_shapes()
            check_against_config(self.keys(), lambda k: self.shape(k)[0], self.lora_config, str(self.directory))

    def _check_shapes(self) -> None:
        """Every rank file holds the same keys, each in the shape its rank holds."""
        keys = set(self._files[0].keys())
        for j, f in enumerate(self._files):
            if set(f.keys()) != keys:
                raise ValueError(f"{shard_file(self.directory, j)} holds other tensors than {shard_file(self.directory, 0)}")
        facts, tp = self.facts, self.saved_tp
        if facts is not None:
            try:
                facts.check_tp(tp)
            except ValueError as e:
                raise ValueError(f"{self.directory / CONFIG_NAME}: tp_size={tp}: {e}") from None
        for key in sorted(keys):
            module, factor, seg = split_key(key)
            a_shape, b_shape = self.shape(module_key(module, "lora_A", seg)), self.shape(module_key(module, "lora_B", seg))
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ValueError(f"{self.directory}: {module} {seg}: lora_A {a_shape} and lora_B {b_shape} do not form a LoRA")
            want = list(self.shape(key))
            known = layout_module(module) if facts is not None else None
            if known is not None:
                layer, kind = known
                if layer is not None and layer >= facts.num_layers:
                    raise ValueError(f"{self.directory}: {key} is beyond the model's {facts.num_layers} layers")
                if seg != kind and seg not in facts.projections(kind):
                    raise ValueError(f"{self.directory}: {key}: segment {seg!r} does not belong to {kind}")
                fan_in, fan_out = facts.module_shape(kind) if seg == kind else facts.projection_shape(seg)
                r = a_shape[0]
                want = [r, fan_in] if factor == "lora_A" else [fan_out, r]
                want = local_shape(want, key_split(self.modules, key)[0], tp, vocab_rows(kind, factor, facts))
            for j in range(tp):
                got = list(self._files[j].get_slice(key).get_shape())
                if got != want:
                    need = "the model facts in " + CONFIG_NAME if known is not None else f"{shard_file(self.directory, 0)}"
                    raise ValueError(
                        f"{shard_file(self.directory, j)}: {key} has shape {got}, but tp_size={tp} and "
                        f"{need} need {want} on every rank"
                    )

    def require_lora(self) -> LoraConfig:
        """The LoRA config; an X-LoRA checkpoint is refused."""
        if self.lora_config is None:
            raise ValueError(f"{self.directory} holds a {self.config['kind']!r} checkpoint, not a LoRA adapter")
        return self.lora_config

    def keys(self) -> list[str]:
        return sorted(self._files[0].keys())

    def check_model(self, facts: ModelFacts) -> None:
        """Refuse a checkpoint made for another model (the vocabulary does not matter); one
        without facts (not made on a GPT model) is checked tensor by tensor as it loads."""
        if self.facts is None:
            return
        saved = ModelFacts.from_dict({**self.config["model"], "vocab_size": facts.vocab_size})
        if saved != facts:
            raise ValueError(f"{self.directory} was made for another model: {saved} vs this model's {facts}")

    def shape(self, key: str) -> list[int]:
        try:
            return self._files[0].get_slice(key).get_shape()
        except SafetensorError as e:
            raise ValueError(f"{shard_file(self.directory, 0)}: cannot read {key!r}: {e}") from None

    def dtype(self, key: str) -> str:
        """safetensors dtype name (``F32``, ``BF16`` ...) of ``key``."""
        return self._files[0].get_slice(key).get_dtype()

    def full_shape(self, key: str) -> list[int]:
        """The TP=1 shape of ``key`` (vocabulary padding removed), from the file headers only."""
        dim, _ = key_split(self.modules, key)
        shape = list(self.shape(key))
        if dim is not None:
            shape[dim] *= self.saved_tp
            shape[dim] = key_vocab_rows(key, self.facts) or shape[dim]
        return shape

    def full(self, key: str) -> torch.Tensor:
        """The TP=1 tensor of ``key`` (vocabulary padding removed)."""
        dim, blocks = key_split(self.modules, key)
        parts = [self._get(j, key) for j in range(self.saved_tp if dim is not None else 1)]
        if dim is None:
            return parts[0]
        full = unshard_rows(parts, blocks) if dim == 0 else torch.cat(parts, dim)
        rows = key_vocab_rows(key, self.facts)
        return full if rows is None else full.narrow(dim, 0, rows).contiguous()

    def local(self, key: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """``key`` as TP rank ``tp_rank`` of ``tp_size`` holds it (reading one file if it can)."""
        dim, blocks = key_split(self.modules, key)
        if dim is None:
            return self._get(0, key)
        if tp_size == self.saved_tp:
            return self._get(tp_rank, key)
        return local_part(self.full(key), dim, blocks, tp_rank, tp_size, key_vocab_rows(key, self.facts))

    def _get(self, rank: int, key: str) -> torch.Tensor:
        try:
            return self._files[rank].get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{shard_file(self.directory, rank)}: cannot read {key!r}: {e}") from None


def write_checkpoint(
    directory: str | Path,
    config: dict,
    shards: Iterable[Callable[[], dict[str, torch.Tensor]] | dict[str, torch.Tensor]],
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint atomically (``outputs.atomic_directory``).

    ``shards`` yields, per TP rank in order, that rank's tensors (or a callable producing
    them, so a converter holds one rank's tensors at a time).
    """
    with atomic_directory(directory, overwrite) as tmp:
        n = 0
        for j, shard in enumerate(shards):
            write_shard(tmp, j, shard() if callable(shard) else shard)
            n += 1
        if n != config["tp_size"]:
            raise ValueError(f"wrote {n} rank files for tp_size={config['tp_size']}")
        write_config(tmp, config)
    return Path(directory)


def write_shard(tmp: Path, tp_rank: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(shard_file(tmp, tp_rank)))


def write_config(tmp: Path, config: dict) -> None:
    """adapter_config.json of a checkpoint being written into ``tmp``."""
    full_config = {"format": MEGATRON_FORMAT, "version": VERSION, **config}
    (tmp / CONFIG_NAME).write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")


def checkpoint_config(kind: str, tp_size: int, facts: Optional[ModelFacts], adapter_config: dict,
                      key: str = "lora_config", modules: Optional[ModuleTable] = None) -> dict:
    """adapter_config.json fields of a checkpoint: ``facts`` None for a model other than a GPT
    model; ``modules`` (the ``modules`` table) for a LoRA checkpoint."""
    cfg = {"kind": kind, "tp_size": tp_size, key: adapter_config}
    if facts is not None:
        cfg["model"] = facts.to_dict()
    if modules is not None:
        cfg["modules"] = modules
    return cfg
