"""HF PEFT LoRA directories <-> our Megatron adapter checkpoint.

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: "LORA"``) and
``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]). Each PEFT module becomes one per-projection segment of our
checkpoint (``decoder.layers.{i}.self_attention.linear_qkv.lora_A.q_proj``); a shared-A
segment of ours exports as one PEFT module per projection (A duplicated, B split), which
computes the same thing.

Conversions are described as *plans*: per output file, a list of :class:`TensorPlan`
(key, shape, dtype and a function reading the tensor), so ``convert`` can stream them to
disk tensor by tensor while the in-memory functions here simply read them all.

Tied embeddings (PEFT's ``ensure_weight_tying``): PEFT gives ``lm_head`` the embedding's
adapter transposed (``lm_head.lora_A.weight`` = ``lora_embedding_B``^T, ``lora_B`` =
``lora_embedding_A``^T, one storage) and saves both. Such a file reads as the embedding's
tensors and a tied ``output_layer`` (``checkpoint.tied_modules``); our tied checkpoints
export the same way. PEFT also saves the frozen base weights of embedding layers it adapts
(``...embed_tokens.base_layer.weight``, ``lm_head.base_layer.weight``); LoRA never changes
them, so they are not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError

from megatron_lora.formats.checkpoint import (
    ShardReader,
    tied_modules,
    adapted_name,
    check_against_config,
    checkpoint_config,
    key_split,
    key_vocab_rows,
    layout_module,
    local_part,
    local_shape,
    layout_module_table,
    make_key,
    module_key,
    parse_key,
    split_key,
)
from megatron_lora.config import LoraConfig
from megatron_lora.formats.detect import CONFIG_NAME, Format, detect_lora
from megatron_lora.formats.files import open_safetensors, read_json
from megatron_lora.hf.layout import (
    EMBED_TOKENS,
    EMBEDDING,
    EMBEDDING_PATH,
    OUTPUT_LAYER,
    HF_PROJECTIONS,
    LM_HEAD,
    PEFT_PREFIX,
    PROJECTION,
    ModelFacts,
    hf_module_name,
    parse_hf_module_name,
    split_shared_b,
)

WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_KEY = re.compile(
    rf"{re.escape(PEFT_PREFIX)}(?P<module>.+)\.(?:(?P<factor>lora_A|lora_B)\.weight|lora_embedding_(?P<efactor>A|B))"
)
#: The frozen base weights PEFT saves with embedding-layer adapters (``save_embedding_layers``).
_PEFT_BASE_KEYS = tuple(f"{PEFT_PREFIX}{hf_module_name(None, m)}.base_layer.weight" for m in (EMBED_TOKENS, LM_HEAD))


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its key, shape, safetensors dtype name and how to read it."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], torch.Tensor]


# -- formats ----------------------------------------------------------------------------------


def read_peft_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig of a PEFT LoRA directory; options we cannot represent are refused by name."""
    path = Path(directory) / CONFIG_NAME
    d = read_json(path)
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={d.get('peft_type')!r} is not a LoRA adapter (expected 'LORA')")
    try:
        return LoraConfig.from_dict(d)
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type
        raise ValueError(f"{path}: {e}") from None


def peft_key(layer: Optional[int], proj: str, factor: str) -> str:
    """PEFT's tensor key: ``<module>.lora_A.weight``, or ``<module>.lora_embedding_A`` on the
    embedding."""
    if proj == EMBED_TOKENS:
        return f"{PEFT_PREFIX}{hf_module_name(layer, proj)}.lora_embedding_{factor[-1]}"
    return f"{PEFT_PREFIX}{hf_module_name(layer, proj)}.{factor}.weight"


# -- reading PEFT files as checkpoint keys ----------------------------------------------------


class PeftReader:
    """A PEFT LoRA directory seen through checkpoint keys, sliced to any TP rank.

    An :class:`~megatron_lora.formats.detect.AdapterReader`, like
    :class:`~megatron_lora.formats.checkpoint.ShardReader`. With ``facts`` every tensor is checked against the
    base model's projection shapes; ``local`` reads only the rows or columns a rank holds.
    """

    #: PEFT files hold the whole (TP=1) tensors.
    saved_tp = 1

    def __init__(self, directory: str | Path, facts: Optional[ModelFacts] = None):
        self.directory = Path(directory)
        self.lora_config = read_peft_config(directory)
        self.facts = facts
        self.path = self.directory / WEIGHTS_NAME
        self._file = open_safetensors(self.path)
        self._peft_keys: dict[str, str] = {}
        for pk in self._file.keys():
            if pk in _PEFT_BASE_KEYS:
                continue
            m = _PEFT_KEY.fullmatch(pk)
            if m is None:
                raise ValueError(
                    f"{self.path}: tensor {pk!r} is not a LoRA factor of a linear projection or the "
                    "embedding (DoRA magnitudes, LoRA biases and modules_to_save are not supported)"
                )
            try:
                layer, proj = parse_hf_module_name(m["module"])
            except ValueError as e:
                raise ValueError(f"{self.path}: tensor {pk!r}: {e}") from None
            factor = m["factor"] or f"lora_{m['efactor']}"
            if peft_key(layer, proj, factor) != pk:  # lora_embedding_* on the embedding only
                raise ValueError(f"{self.path}: tensor {pk!r}: PEFT names it {peft_key(layer, proj, factor)!r}")
            key = make_key(layer, PROJECTION[proj][1], factor, proj)
            if key in self._peft_keys:
                raise ValueError(f"{self.path}: tensors {self._peft_keys[key]!r} and {pk!r} name the same module")
            self._peft_keys[key] = pk
        self._check()
        tied = self._tied_output_layer()
        self.modules = layout_module_table(self.keys(), facts)
        if tied:
            self.modules[OUTPUT_LAYER] = {"parallel": "column", "tied": EMBEDDING_PATH, "segments": {LM_HEAD: {"blocks": 1}}}
        check_against_config(self.keys(), lambda k: self.shape(k)[0], self.lora_config, str(self.path), facts,
                             tied=tied_modules(self.modules))

    def _tied_output_layer(self) -> bool:
        """Whether lm_head's tensors are the embedding's, tied by PEFT's ``ensure_weight_tying``
        (then they leave the keys). With ``ensure_weight_tying`` and lm_head's tensors the
        embedding's transposed, PEFT tied them; other lm_head tensors are a separate adapter
        (a base without tied embeddings), unless the targets leave lm_head to the tie."""
        config = self.lora_config
        lm = {f: make_key(None, OUTPUT_LAYER, f, LM_HEAD) for f in ("lora_A", "lora_B")}
        emb = {f: make_key(None, EMBEDDING, f, EMBED_TOKENS) for f in ("lora_A", "lora_B")}
        if not (config.ensure_weight_tying and config.names_tied_layer() and lm["lora_A"] in self._peft_keys):
            return False
        tied = all(k in self._peft_keys for k in emb.values()) and torch.equal(
            self.full(lm["lora_A"]), self.full(emb["lora_B"]).t()) and torch.equal(self.full(lm["lora_B"]), self.full(emb["lora_A"]).t())
        if not tied and not config.matches(LM_HEAD):
            raise ValueError(
                f"{self.path}: ensure_weight_tying ties lm_head's adapter to embed_tokens', but the file's lm_head "
                "tensors are not the embedding's transposed (PEFT would load one over the other)"
            )
        if tied:
            for key in lm.values():
                del self._peft_keys[key]
        return tied

    def _check(self) -> None:
        for key in self.keys():
            layer, module, factor, proj = parse_key(key)
            other = make_key(layer, module, "lora_B" if factor == "lora_A" else "lora_A", proj)
            if other not in self._peft_keys:
                raise ValueError(f"{self.path}: {self._peft_keys[key]!r} has no matching {other.split('.')[-2]}")
            if factor == "lora_B":
                continue
            a, b = self.shape(key), self.shape(other)
            name = hf_module_name(layer, proj)
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise ValueError(f"{self.path}: {name}: lora_A {a} and lora_B {b} do not form a LoRA")
            if self.facts is None:
                continue
            if layer is not None and layer >= self.facts.num_layers:
                raise ValueError(f"{self.path}: {name} is beyond the base model's {self.facts.num_layers} layers")
            fan_in, fan_out = self.facts.projection_shape(proj)
            if a[1] != fan_in or b[0] != fan_out:
                raise ValueError(
                    f"{self.path}: adapter made for another base: {name} has lora_A {a} / lora_B {b}, "
                    f"the base model's {name} needs lora_A [r, {fan_in}] / lora_B [{fan_out}, r]"
                )

    def keys(self) -> list[str]:
        return sorted(self._peft_keys)

    def peft_key(self, key: str) -> str:
        return self._peft_keys[key]

    def shape(self, key: str) -> list[int]:
        return list(self._file.get_slice(self._peft_keys[key]).get_shape())

    full_shape = shape

    def dtype(self, key: str) -> str:
        return self._file.get_slice(self._peft_keys[key]).get_dtype()

    def full(self, key: str) -> torch.Tensor:
        return self._read(key, lambda s: s[:])

    def local(self, key: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        dim, blocks = key_split(self.modules, key)
        if dim is None:
            return self.full(key)
        rows = key_vocab_rows(key, self.facts)
        if rows is not None:  # padded vocabulary rows
            return local_part(self.full(key), dim, blocks, tp_rank, tp_size, rows)
        n = self.shape(key)[dim] // tp_size
        part = slice(tp_rank * n, (tp_rank + 1) * n)
        return self._read(key, (lambda s: s[part]) if dim == 0 else (lambda s: s[:, part]))

    def _read(self, key: str, take) -> torch.Tensor:
        try:
            return take(self._file.get_slice(self._peft_keys[key])).contiguous()
        except SafetensorError as e:
            raise ValueError(f"{self.path}: cannot read {self._peft_keys[key]!r}: {e}") from None


def open_adapter(directory: str | Path, facts: Optional[ModelFacts] = None):
    """(reader, LoraConfig) of a PEFT directory or a megatron-lora LoRA checkpoint.

    With ``facts``, a checkpoint made for another model is refused.
    """
    if detect_lora(directory) is Format.PEFT_LORA:
        reader = PeftReader(directory, facts)
        return reader, reader.lora_config
    reader = ShardReader(directory)
    config = reader.require_lora()
    if facts is not None:
        reader.check_model(facts)
    return reader, config


# -- plans ------------------------------------------------------------------------------------


def megatron_plan(reader, config: LoraConfig, facts: Optional[ModelFacts], tp: int) -> tuple[dict, list[list[TensorPlan]]]:
    """Our checkpoint at TP=``tp`` from any reader: (checkpoint config, per-rank plans)."""
    if facts is not None:
        facts.check_tp(tp)
    ranks = []
    for j in range(tp):
        plans = []
        for key in reader.keys():
            dim, blocks = key_split(reader.modules, key)
            rows = key_vocab_rows(key, facts)
            full = reader.full_shape(key)
            if dim is not None and rows is None and full[dim] % (tp * blocks):
                raise ValueError(f"{key}: tensor parallel size {tp} does not divide its {full[dim]} split rows")
            shape = local_shape(full, dim, tp, rows)
            plans.append(TensorPlan(key, tuple(shape), reader.dtype(key), _bind(reader.local, key, j, tp)))
        ranks.append(plans)
    return checkpoint_config("lora", tp, facts, config.to_dict(), modules=reader.modules), ranks


def peft_plan(reader: ShardReader, config: LoraConfig) -> tuple[dict, list[TensorPlan]]:
    """A PEFT LoRA directory from our checkpoint: (adapter_config.json dict, plan).

    Shared-A segments become one PEFT module per projection (A duplicated, B split with
    ``layout.split_shared_b``); per-projection segments map one to one.
    """
    facts = reader.facts
    plans: list[TensorPlan] = []
    modules: dict[str, tuple[int, float]] = {}
    for key in reader.keys():
        module_name, factor, seg = split_key(key)
        known = layout_module(module_name)
        if known is None or facts is None:
            raise ValueError(
                f"{reader.directory}: {module_name} has no HF PEFT name: only the linears of "
                "the LLaMA-family layout of a GPT model convert to PEFT"
            )
        layer, module = known
        shared = seg == module
        projections = facts.projections(module) if shared else (seg,)
        r = reader.full_shape(make_key(layer, module, "lora_A", seg))[0]
        alpha = config.rank_alpha(adapted_name(key))[1]
        for proj in projections:
            modules[hf_module_name(layer, proj)] = (r, alpha)
            fan_in, fan_out = facts.projection_shape(proj)
            shape = (r, fan_in) if factor == "lora_A" else (fan_out, r)
            if shared and factor == "lora_B":
                read = _bind(_shared_b, reader, key, module, proj, facts)
            else:
                read = _bind(reader.full, key)
            plans.append(TensorPlan(peft_key(layer, proj, factor), shape, reader.dtype(key), read))
    for source in tied_modules(reader.modules).values():
        # lm_head tied to the embedding: PEFT saves the embedding's factors transposed.
        seg = next(iter(reader.modules[source]["segments"]))
        a_key, b_key = module_key(source, "lora_A", seg), module_key(source, "lora_B", seg)
        r = reader.full_shape(a_key)[0]
        fan_in, fan_out = facts.projection_shape(LM_HEAD)
        plans.append(TensorPlan(peft_key(None, LM_HEAD, "lora_A"), (r, fan_in), reader.dtype(b_key), _bind(_transposed, reader, b_key)))
        plans.append(TensorPlan(peft_key(None, LM_HEAD, "lora_B"), (fan_out, r), reader.dtype(a_key), _bind(_transposed, reader, a_key)))
    return peft_config_dict(config, modules, facts), plans


def _bind(fn, *args) -> Callable[[], torch.Tensor]:
    return lambda: fn(*args)


def _transposed(reader: ShardReader, key: str) -> torch.Tensor:
    return reader.full(key).t().contiguous()


def _shared_b(reader: ShardReader, key: str, module: str, proj: str, facts: ModelFacts) -> torch.Tensor:
    return split_shared_b(module, reader.full(key), facts)[proj].contiguous()


def peft_config_dict(config: LoraConfig, modules: dict[str, tuple[int, float]], facts: ModelFacts) -> dict:
    """PEFT adapter_config.json adapting exactly ``modules`` (HF name -> (r, alpha)).

    target_modules is the list of projection names present; when that list (with the
    config's layers_to_transform / exclude_modules) would adapt other modules too, it becomes
    a regex of the exact module names. Modules whose rank or alpha the patterns would not
    give get their own rank_pattern / alpha_pattern entry (first match wins, so in front).
    """
    present = [p for p in (EMBED_TOKENS, *HF_PROJECTIONS, LM_HEAD) if any(n == p or n.endswith("." + p) for n in modules)]
    fields = {**config.to_dict(), "target_modules": present}
    every = {hf_module_name(i, p): i for i in range(facts.num_layers) for p in HF_PROJECTIONS}
    every |= {hf_module_name(None, p): None for p in (EMBED_TOKENS, LM_HEAD)}

    def adapted(cfg: LoraConfig) -> set[str]:
        return {n for n, i in every.items() if cfg.matches(n, i)}

    if adapted(LoraConfig(**fields)) != set(modules):
        exact = "|".join(re.escape(n) for n in sorted(modules))
        fields.update(target_modules=exact, layers_to_transform=None, exclude_modules=None)
    base = LoraConfig(**fields)
    rank_extra = {re.escape(n): r for n, (r, a) in modules.items() if base.rank_alpha(n)[0] != r}
    alpha_extra = {re.escape(n): a for n, (r, a) in modules.items() if base.rank_alpha(n)[1] != a}
    # Keys that match no exported module (e.g. Megatron names of shared-A segments) are dropped.
    fields.update(
        rank_pattern={**rank_extra, **_used(config.rank_pattern, modules)},
        alpha_pattern={**alpha_extra, **_used(config.alpha_pattern, modules)},
    )
    final = LoraConfig(**fields)
    assert adapted(final) == set(modules) and all(final.rank_alpha(n) == ra for n, ra in modules.items())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "inference_mode": True,
        **final.to_dict(),
    }


def _used(patterns: dict, modules) -> dict:
    return {k: v for k, v in patterns.items() if any(re.match(rf"(.*\.)?({k})$", n) for n in modules)}


# -- in-memory conversions --------------------------------------------------------------------


def peft_to_megatron(
    peft_dir: str | Path, facts: ModelFacts, tp: int
) -> tuple[dict, Iterator[dict[str, torch.Tensor]]]:
    """(checkpoint config, generator of each TP rank's tensors) for a PEFT LoRA directory."""
    reader = PeftReader(peft_dir, facts)
    config, ranks = megatron_plan(reader, reader.lora_config, facts, tp)
    return config, ({p.key: p.read() for p in plans} for plans in ranks)


def reshard(megatron_dir: str | Path, tp: int) -> tuple[dict, Iterator[dict[str, torch.Tensor]]]:
    """(checkpoint config, generator of each rank's tensors) of a checkpoint at another TP."""
    reader, config = open_adapter(megatron_dir)
    config_dict, ranks = megatron_plan(reader, config, reader.facts, tp)
    return config_dict, ({p.key: p.read() for p in plans} for plans in ranks)


def megatron_to_peft(megatron_dir: str | Path, facts: Optional[ModelFacts] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(PEFT adapter_config.json dict, PEFT tensors) of a megatron-lora checkpoint (any TP)."""
    reader, config = open_adapter(megatron_dir, facts)
    if not isinstance(reader, ShardReader):
        raise ValueError(f"{megatron_dir} is already a PEFT LoRA directory")
    peft_config, plans = peft_plan(reader, config)
    return peft_config, {p.key: p.read() for p in plans}
