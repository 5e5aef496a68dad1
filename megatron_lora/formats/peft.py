"""HF PEFT LoRA directories <-> our Megatron adapter checkpoint.

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: "LORA"``) and
``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]), with ``use_dora`` also ``...lora_magnitude_vector`` ([out],
no ``.weight``; on the embedding [hidden]). Each PEFT module becomes one per-projection segment of our
checkpoint (``decoder.layers.{i}.self_attention.linear_qkv.lora_A.q_proj``); a shared-A
segment of ours exports as one PEFT module per projection (A duplicated, B split), which
computes the same thing.

Conversions are described as *plans*: per output file, a list of :class:`TensorPlan`
(key, shape, dtype and a function reading the tensor; :mod:`megatron_lora.formats.plans`), so
``convert`` can stream them to disk tensor by tensor while the in-memory functions here simply
read them all. The mixture-of-experts layouts on export are in :mod:`megatron_lora.formats.peft_moe`.

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
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError

from megatron_lora.formats.checkpoint import (
    ShardReader,
    tied_modules,
    check_against_config,
    checkpoint_config,
    key_split,
    key_vocab_rows,
    layout_module,
    local_part,
    local_shape,
    layout_module_table,
    make_key,
    segment_factors,
    module_key,
    segment_name,
    split_key,
)
from megatron_lora.config import LoraConfig
from megatron_lora.formats.detect import CONFIG_NAME, Format, detect_lora
from megatron_lora.formats.files import open_safetensors, read_json
from megatron_lora.formats.peft_moe import _fused_plans, peft_module_key, _per_expert_plans
from megatron_lora.formats.plans import TensorPlan, bind
from megatron_lora.hf.layout import (
    EMBED_TOKENS,
    EXPERT_MODULES,
    FUSED_EXPERTS,
    EMBEDDING,
    EMBEDDING_PATH,
    OUTPUT_LAYER,
    HF_PROJECTIONS,
    LAYER_INDEX,
    LM_HEAD,
    MOE_LAYOUTS,
    MOE_PARAMETERS,
    PEFT_PREFIX,
    PROJECTION,
    ROUTER,
    ModelFacts,
    MoeModule,
    MoeNames,
    expert_factor,
    hf_module_name,
    parse_hf_module_name,
    parse_moe_hf_name,
    parse_moe_module,
    peft_module_names,
    split_shared_b,
)

WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_KEY = re.compile(
    rf"{re.escape(PEFT_PREFIX)}(?P<module>.+)\.(?:(?P<factor>lora_A|lora_B)\.weight|lora_embedding_(?P<efactor>A|B)"
    r"|(?P<magnitude>lora_magnitude_vector))"
)
#: The frozen base weights PEFT saves with embedding-layer adapters (``save_embedding_layers``).
_PEFT_BASE_KEYS = tuple(f"{PEFT_PREFIX}{hf_module_name(None, m)}.base_layer.weight" for m in (EMBED_TOKENS, LM_HEAD))


# -- formats ----------------------------------------------------------------------------------


def read_peft_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig of a PEFT LoRA directory; options we cannot represent are refused by
    name, and so is what PEFT refuses on ``target_parameters``."""
    path = Path(directory) / CONFIG_NAME
    d = read_json(path)
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={d.get('peft_type')!r} is not a LoRA adapter (expected 'LORA')")
    try:
        config = LoraConfig.from_dict(d)
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type
        raise ValueError(f"{path}: {e}") from None
    if config.target_parameters:
        check_target_parameters_config(config, str(path))
    return config


def check_target_parameters_config(config: LoraConfig, where: str) -> None:
    """Refuse what PEFT refuses on ``target_parameters`` (its ParamWrapper): DoRA (which
    LoraConfig refuses anyway) and a dropout other than 0."""
    if config.lora_dropout:
        raise ValueError(f"{where}: lora_dropout={config.lora_dropout} with target_parameters: PEFT's "
                         "target_parameters (fused experts) take no dropout (only 0)")


def peft_key(layer: Optional[int], proj: str, factor: str) -> str:
    """PEFT's tensor key: ``<module>.lora_A.weight``, or ``<module>.lora_embedding_A`` on the
    embedding; a DoRA magnitude is ``<module>.lora_magnitude_vector`` everywhere."""
    if factor == "lora_magnitude_vector":
        return f"{PEFT_PREFIX}{hf_module_name(layer, proj)}.{factor}"
    if proj == EMBED_TOKENS:
        return f"{PEFT_PREFIX}{hf_module_name(layer, proj)}.lora_embedding_{factor[-1]}"
    return f"{PEFT_PREFIX}{hf_module_name(layer, proj)}.{factor}.weight"


# -- reading PEFT files as checkpoint keys ----------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where a checkpoint key's tensor is in the PEFT file: tensor ``key`` whole, or (fused
    experts) expert ``expert`` of ``experts`` (:func:`layout.expert_factor`)."""

    key: str
    #: The name PEFT matches the tensor's module or parameter under.
    name: str
    expert: Optional[int] = None
    experts: int = 1


class PeftReader:
    """A PEFT LoRA directory seen through checkpoint keys, sliced to any TP rank.

    An :class:`~megatron_lora.formats.detect.AdapterReader`, like
    :class:`~megatron_lora.formats.checkpoint.ShardReader`. With ``facts`` every tensor is checked against the
    base model's projection shapes; ``local`` reads only the rows or columns a rank holds.

    Mixture-of-experts adapters come in two layouts (``moe_layout``): ``"per-expert"``
    (transformers 4's modules ``{block}.experts.{e}.{proj}`` and ``{block}.gate``) and
    ``"fused"`` (transformers 5's parameters through ``target_parameters``: one LoRA per
    ``mlp.experts.gate_up_proj`` / ``down_proj`` over all experts, ``mlp.gate.weight``). Both
    become per-expert keys of ours; the config is PEFT's, which matches them as it is.
    """

    #: PEFT files hold the whole (TP=1) tensors.
    saved_tp = 1

    def __init__(self, directory: str | Path, facts: Optional[ModelFacts] = None):
        self.directory = Path(directory)
        self.lora_config = read_peft_config(directory)
        self.facts = facts
        self.path = self.directory / WEIGHTS_NAME
        self._file = open_safetensors(self.path)
        self._sources: dict[str, _Source] = {}
        self._cached: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)  # the last fused tensor read
        fused: dict[int, dict[int, dict[str, str]]] = {}  # layer -> nesting depth -> factor -> PEFT key
        per_expert = False
        for pk in self._file.keys():
            if pk in _PEFT_BASE_KEYS:
                continue
            m = _PEFT_KEY.fullmatch(pk)
            if m is None:
                raise ValueError(
                    f"{self.path}: tensor {pk!r} is not a LoRA factor or DoRA magnitude of a linear projection, "
                    "an expert or the embedding (LoRA biases and modules_to_save are not supported)"
                )
            factor = m["factor"] or m["magnitude"] or f"lora_{m['efactor']}"
            moe, nested = parse_moe_hf_name(m["module"]), _FUSED_MODULE.fullmatch(m["module"])
            if moe is not None or nested is not None:
                if m["magnitude"]:
                    raise ValueError(f"{self.path}: tensor {pk!r}: DoRA on MoE experts and the router is not supported")
                if m["efactor"]:
                    raise ValueError(f"{self.path}: tensor {pk!r}: PEFT names it {peft_module_key(m['module'], factor)!r}")
                if nested is not None:
                    fused.setdefault(int(nested["layer"]), {}).setdefault(nested["nest"].count("."), {})[factor] = pk
                    continue
                module, seg = moe
                per_expert |= module.module != ROUTER
                self._add(module_key(module.name, factor, seg), _Source(pk, m["module"]))
                continue
            try:
                layer, proj = parse_hf_module_name(m["module"])
            except ValueError as e:
                raise ValueError(f"{self.path}: tensor {pk!r}: {e} (or an expert: model.layers.N.mlp.experts, "
                                 "model.layers.N.{mlp|block_sparse_moe}.experts.E.PROJ, ...gate)") from None
            if peft_key(layer, proj, factor) != pk:  # lora_embedding_* on the embedding only
                raise ValueError(f"{self.path}: tensor {pk!r}: PEFT names it {peft_key(layer, proj, factor)!r}")
            self._add(make_key(layer, PROJECTION[proj][1], factor, proj), _Source(pk, hf_module_name(layer, proj)))
        if fused and per_expert:
            raise ValueError(f"{self.path}: holds both fused (transformers 5) and per-expert (transformers 4) expert tensors")
        #: PEFT's layout of the experts (None: no expert is adapted).
        self.moe_layout = "fused" if fused else "per-expert" if per_expert else None
        for layer, depths in sorted(fused.items()):
            self._add_fused(layer, depths)
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
        if not (config.ensure_weight_tying and config.names_tied_layer() and lm["lora_A"] in self._sources):
            return False
        tied = all(k in self._sources for k in emb.values()) and torch.equal(
            self.full(lm["lora_A"]), self.full(emb["lora_B"]).t()) and torch.equal(self.full(lm["lora_B"]), self.full(emb["lora_A"]).t())
        if not tied and not config.matches(LM_HEAD):
            raise ValueError(
                f"{self.path}: ensure_weight_tying ties lm_head's adapter to embed_tokens', but the file's lm_head "
                "tensors are not the embedding's transposed (PEFT would load one over the other)"
            )
        if tied:
            for key in lm.values():
                del self._sources[key]
        return tied

    def _add(self, key: str, source: _Source) -> None:
        if key in self._sources:
            raise ValueError(f"{self.path}: tensors {self._sources[key].key!r} and {source.key!r} name the same module")
        self._sources[key] = source

    def _add_fused(self, layer: int, depths: dict[int, dict[str, str]]) -> None:
        """Per-expert keys of layer ``layer``'s fused expert tensors: which parameter each
        nesting depth adapts follows from ``target_parameters`` (PEFT wraps the targeted
        parameters of a module in the order the module defines them, the first innermost)
        and is checked against the shapes."""
        params = {m: MoeModule(layer, 0, m).parameter for m in EXPERT_MODULES}
        targeted = [m for m in EXPERT_MODULES if self.lora_config.matches_parameter(params[m])]
        where = f"{self.path}: {PEFT_PREFIX}model.layers.{layer}.{FUSED_EXPERTS}"
        if sorted(depths) != list(range(len(targeted))):
            raise ValueError(f"{where}: {len(depths)} nested LoRA(s) (.base_layer depths {sorted(depths)}), but "
                             f"target_parameters={self.lora_config.target_parameters!r} adapt "
                             f"{[params[m] for m in targeted] or 'none'} of its parameters")
        found = {}
        for i, module in enumerate(targeted):
            pks = depths[len(targeted) - 1 - i]
            if set(pks) != {"lora_A", "lora_B"}:
                raise ValueError(f"{where}: the LoRA of {params[module]} lacks {({'lora_A', 'lora_B'} - set(pks)).pop()}")
            a, b = (list(self._file.get_slice(pks[f]).get_shape()) for f in ("lora_A", "lora_B"))
            r = self.lora_config.rank_alpha(params[module])[0]
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] % r:
                raise ValueError(f"{where}: {params[module]}: lora_A {a} and lora_B {b} are not a LoRA of rank {r} "
                                 "(its effective rank) per expert")
            found[module] = (pks, a, b, a[0] // r)
        if self.facts is not None and self.facts.moe is not None:
            moe, h = self.facts.moe, self.facts.hidden_size
            for module, (_, a, b, experts) in found.items():
                fan_in, fan_out = moe.segment_shape(module, h)
                if (a[1], b[0], experts) != (fan_in, fan_out, moe.num_experts):
                    raise ValueError(f"{where}: adapter made for another base: {params[module]} has lora_A {a} / "
                                     f"lora_B {b}; the base's {moe.num_experts} experts need [E x r, {fan_in}] / "
                                     f"[{fan_out}, E x r]")
        elif len(found) == 2:  # no facts: the two parameters must at least agree with each other
            (_, a1, b1, e1), (_, a2, b2, e2) = found["linear_fc1"], found["linear_fc2"]
            if e1 != e2 or a1[1] != b2[0] or b1[0] != 2 * a2[1]:
                raise ValueError(f"{where}: gate_up_proj (lora_A {a1}, lora_B {b1}) and down_proj (lora_A {a2}, "
                                 f"lora_B {b2}) do not fit one set of experts")
        for module, (pks, _, _, experts) in found.items():
            for e in range(experts):
                for factor, pk in pks.items():
                    self._add(module_key(MoeModule(layer, e, module).name, factor, module), _Source(pk, params[module], e, experts))

    def _check(self) -> None:
        dora = self.lora_config.use_dora
        for key in self.keys():
            module, factor, seg = split_key(key)
            # Every module has A, B and, exactly when use_dora, a magnitude.
            for other in (module_key(module, f, seg) for f in segment_factors(dora)):
                if other not in self._sources:
                    raise ValueError(f"{self.path}: {self._sources[key].key!r} has no matching {other.split('.')[-2]}"
                                     f"{' (use_dora is true)' if dora else ''}")
            name, b_key = self._sources[key].name, module_key(module, "lora_B", seg)
            if factor == "lora_magnitude_vector" and not dora:
                raise ValueError(f"{self.path}: {self._sources[key].key!r} is a DoRA magnitude, but use_dora is false")
            if factor == "lora_magnitude_vector":
                m, b = self.shape(key), self.shape(b_key)
                if len(m) != 1 or len(b) != 2 or m[0] != b[0]:
                    raise ValueError(f"{self.path}: {name}: lora_magnitude_vector {m} does "
                                     f"not match lora_B {b} (one entry per row of B)")
            if factor != "lora_A" or self._sources[key].expert is not None:  # fused: checked as a whole
                continue
            a, b = self.shape(key), self.shape(b_key)
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise ValueError(f"{self.path}: {name}: lora_A {a} and lora_B {b} do not form a LoRA")
            if self.facts is None:
                continue
            moe = parse_moe_module(module)
            if moe is not None:
                facts = self.facts.moe
                if facts is None or moe.layer not in facts.layers or (moe.expert or 0) >= facts.num_experts:
                    raise ValueError(f"{self.path}: adapter made for another base: the base model has no {name}")
                fan_in, fan_out = facts.segment_shape(seg, self.facts.hidden_size)
            else:
                layer, _ = layout_module(module)
                if layer is not None and layer >= self.facts.num_layers:
                    raise ValueError(f"{self.path}: {name} is beyond the base model's {self.facts.num_layers} layers")
                fan_in, fan_out = self.facts.projection_shape(seg)
            if a[1] != fan_in or b[0] != fan_out:
                raise ValueError(
                    f"{self.path}: adapter made for another base: {name} has lora_A {a} / lora_B {b}, "
                    f"the base model's {name} needs lora_A [r, {fan_in}] / lora_B [{fan_out}, r]"
                )

    def keys(self) -> list[str]:
        return sorted(self._sources)

    def peft_key(self, key: str) -> str:
        return self._sources[key].key

    def shape(self, key: str) -> list[int]:
        src = self._sources[key]
        shape = list(self._file.get_slice(src.key).get_shape())
        if src.expert is not None:
            shape[0 if split_key(key)[1] == "lora_A" else 1] //= src.experts
        return shape

    full_shape = shape

    def dtype(self, key: str) -> str:
        return self._file.get_slice(self._sources[key].key).get_dtype()

    def full(self, key: str) -> torch.Tensor:
        src = self._sources[key]
        if src.expert is None:
            return self._read(key, lambda s: s[:])
        return expert_factor(self._read_cached(src.key), split_key(key)[1], src.experts, src.expert)

    def local(self, key: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        dim, blocks = key_split(self.modules, key)
        if dim is None:
            return self.full(key)
        rows = key_vocab_rows(key, self.facts)
        if rows is not None or blocks > 1 or self._sources[key].expert is not None:
            return local_part(self.full(key), dim, blocks, tp_rank, tp_size, rows)
        n = self.shape(key)[dim] // tp_size
        part = slice(tp_rank * n, (tp_rank + 1) * n)
        return self._read(key, (lambda s: s[part]) if dim == 0 else (lambda s: s[:, part]))

    def _read(self, key: str, take) -> torch.Tensor:
        pk = self._sources[key].key
        try:
            return take(self._file.get_slice(pk)).contiguous()
        except SafetensorError as e:
            raise ValueError(f"{self.path}: cannot read {pk!r}: {e}") from None

    def _read_cached(self, pk: str) -> torch.Tensor:
        # A fused tensor is read once for its experts' keys (converters read them one by one).
        if self._cached[0] != pk:
            try:
                self._cached = (pk, self._file.get_tensor(pk))
            except SafetensorError as e:
                raise ValueError(f"{self.path}: cannot read {pk!r}: {e}") from None
        return self._cached[1]


#: transformers 5's experts module in a PEFT key, with PEFT's nesting of several wrapped parameters.
_FUSED_MODULE = re.compile(rf"model\.layers\.(?P<layer>{LAYER_INDEX})\.{re.escape(FUSED_EXPERTS)}(?P<nest>(?:\.base_layer)*)")


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
            plans.append(TensorPlan(key, tuple(shape), reader.dtype(key), bind(reader.local, key, j, tp)))
        ranks.append(plans)
    return checkpoint_config("lora", tp, facts, config.to_dict(), modules=reader.modules), ranks


def peft_plan(reader: ShardReader, config: LoraConfig, moe_layout: str = "fused",
              names: Optional[MoeNames] = None) -> tuple[dict, list[TensorPlan]]:
    """A PEFT LoRA directory from our checkpoint: (adapter_config.json dict, plan).

    Shared-A segments become one PEFT module per projection (A duplicated, B split with
    ``layout.split_shared_b``); per-projection segments map one to one. Experts and routers
    go to ``moe_layout`` (:data:`MOE_LAYOUTS`): ``"fused"`` (:func:`_fused_plans`) or
    ``"per-expert"`` with the module names of ``names`` (:data:`layout.MOE_HF_NAMES`).
    """
    if moe_layout not in MOE_LAYOUTS:
        raise ValueError(f"moe_layout={moe_layout!r}: expected one of {MOE_LAYOUTS}")
    facts = reader.facts
    plans: list[TensorPlan] = []
    modules: dict[str, tuple[int, float]] = {}
    experts: dict[MoeModule, dict[str, str]] = {}  # segment -> A key
    for key in reader.keys():
        module_name, factor, seg = split_key(key)
        moe = parse_moe_module(module_name)
        if moe is not None:
            if factor == "lora_A":
                experts.setdefault(moe, {})[seg] = key
            continue
        known = layout_module(module_name)
        if known is None or facts is None or facts.v_head_dim is not None:
            raise ValueError(
                f"{reader.directory}: {module_name} has no HF PEFT name: only the linears of "
                "the LLaMA-family layout of a GPT model (not multi-latent attention) and its experts convert to PEFT"
            )
        layer, module = known
        shared = seg == module
        projections = facts.projections(module) if shared else (seg,)
        r = reader.full_shape(make_key(layer, module, "lora_A", seg))[0]
        alpha = config.rank_alpha(segment_name(config, key))[1]
        for proj in projections:
            modules[hf_module_name(layer, proj)] = (r, alpha)
            fan_in, fan_out = facts.projection_shape(proj)
            shape = {"lora_A": (r, fan_in), "lora_B": (fan_out, r), "lora_magnitude_vector": (fan_out,)}[factor]
            if shared and factor != "lora_A":  # B and the magnitude: rows of the fused layout
                read = bind(_shared_b, reader, key, module, proj, facts)
            else:
                read = bind(reader.full, key)
            plans.append(TensorPlan(peft_key(layer, proj, factor), shape, reader.dtype(key), read))
    for source in tied_modules(reader.modules).values():
        # lm_head tied to the embedding: PEFT saves the embedding's factors transposed.
        seg = next(iter(reader.modules[source]["segments"]))
        a_key, b_key = module_key(source, "lora_A", seg), module_key(source, "lora_B", seg)
        r = reader.full_shape(a_key)[0]
        fan_in, fan_out = facts.projection_shape(LM_HEAD)
        plans.append(TensorPlan(peft_key(None, LM_HEAD, "lora_A"), (r, fan_in), reader.dtype(b_key), bind(_transposed, reader, b_key)))
        plans.append(TensorPlan(peft_key(None, LM_HEAD, "lora_B"), (fan_out, r), reader.dtype(a_key), bind(_transposed, reader, a_key)))
    params: dict[str, tuple[int, float]] = {}
    if experts:
        if facts is None or facts.moe is None:
            raise ValueError(f"{reader.directory}: its experts need the mixture-of-experts model facts, which it lacks")
        if moe_layout == "fused":
            check_target_parameters_config(config, f"{reader.directory}: exporting experts to target_parameters")
            plans += _fused_plans(reader, config, experts, params)
        elif names is None:
            raise ValueError("the per-expert PEFT layout needs the model's expert names (the HF base model, --base)")
        else:
            plans += _per_expert_plans(reader, config, experts, modules, names)
    return peft_config_dict(config, modules, facts, names if moe_layout == "per-expert" else None, params), plans


def _transposed(reader: ShardReader, key: str) -> torch.Tensor:
    return reader.full(key).t().contiguous()


def _shared_b(reader: ShardReader, key: str, module: str, proj: str, facts: ModelFacts) -> torch.Tensor:
    return split_shared_b(module, reader.full(key), facts)[proj].contiguous()


def exact_config(config: LoraConfig, modules: dict[str, tuple[int, float]], every: dict[str, Optional[int]],
                 rated: Optional[dict[str, tuple[int, float]]] = None) -> LoraConfig:
    """``config`` changed to adapt exactly ``modules`` (name -> (r, alpha)) among ``every``
    (name -> layer), each at its rank and alpha, as do ``rated`` names (parameters, which
    targets do not select).

    target_modules is the list of the modules' last name components; when that list (with the
    config's layers_to_transform / exclude_modules) would adapt other modules too, it becomes
    a regex of the exact module names. Names whose rank or alpha the patterns would not give
    get their own rank_pattern / alpha_pattern entry (first match wins, so in front).
    """
    rated = {**modules, **(rated or {})}
    known = (EMBED_TOKENS, *HF_PROJECTIONS, LM_HEAD)
    leaves = {n.rsplit(".", 1)[-1] for n in modules}
    present = [p for p in known if p in leaves] + sorted(leaves - set(known))
    fields = {**config.to_dict(), "target_modules": present, "target_parameters": None}

    def adapted(cfg: LoraConfig) -> set[str]:
        return {n for n, i in every.items() if cfg.matches(n, i)}

    if adapted(LoraConfig(**fields)) != set(modules):
        exact = "|".join(re.escape(n) for n in sorted(modules))
        fields.update(target_modules=exact, layers_to_transform=None, exclude_modules=None)
    base = LoraConfig(**fields)
    rank_extra = {re.escape(n): r for n, (r, a) in rated.items() if base.rank_alpha(n)[0] != r}
    alpha_extra = {re.escape(n): a for n, (r, a) in rated.items() if base.rank_alpha(n)[1] != a}
    # Keys that match no exported name (e.g. Megatron names of shared-A segments) are dropped.
    fields.update(
        rank_pattern={**rank_extra, **_used(config.rank_pattern, rated)},
        alpha_pattern={**alpha_extra, **_used(config.alpha_pattern, rated)},
    )
    final = LoraConfig(**fields)
    assert adapted(final) == set(modules)
    assert all(final.rank_alpha(n) == ra for n, ra in rated.items())
    return final


def peft_config_dict(config: LoraConfig, modules: dict[str, tuple[int, float]], facts: ModelFacts,
                     names: Optional[MoeNames] = None, params: Optional[dict[str, tuple[int, float]]] = None) -> dict:
    """PEFT adapter_config.json adapting exactly ``modules`` (HF name -> (r, alpha)) and the
    parameters ``params`` (transformers 5 name -> (r, alpha)) through target_parameters
    (:func:`exact_config`; ``names``: transformers 4's expert modules may be in ``modules``).

    A parameter kind adapted in every mixture-of-experts layer is targeted by its trailing
    name (``mlp.experts.gate_up_proj``), else by its full names.
    """
    final = exact_config(config, modules, peft_module_names(facts, names), params)
    targets = []
    for kind in MOE_PARAMETERS:  # a kind adapted in every MoE layer by its trailing name, else by full names
        full = [MoeModule(i, 0, kind).parameter for i in facts.moe.layers] if facts.moe is not None else []
        have = [n for n in full if n in (params or {})]
        targets += [f"mlp.{MOE_PARAMETERS[kind]}"] if have and have == full else have
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "inference_mode": True,
        **final.to_dict(),
        "target_parameters": targets or None,
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
