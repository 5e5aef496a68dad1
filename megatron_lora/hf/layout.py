"""Every HF <-> Megatron name and layout rule (LLaMA family, megatron-core local spec).

* Names: HF ``model.layers.{i}.self_attn.q_proj`` <-> Megatron
  ``decoder.layers.{i}.self_attention.linear_qkv`` (segment ``q_proj``), with GLOBAL i.
* Fused rows: Megatron's ``linear_qkv`` at TP=1 is, per query group, ``[q heads of the
  group; k; v]``; rank j of N holds a contiguous chunk of groups. Gated ``linear_fc1`` at
  TP=1 is ``[gate; up]``; rank j holds ``[gate_j; up_j]`` (``blocks=2`` in
  :func:`megatron_lora.parallel.lora_layers.shard_rows`).
* Mixture of experts (Qwen3-MoE, Mixtral): HF ``{block}.gate`` <-> Megatron ``mlp.router``
  (replicated); HF expert e's gate/up/down <-> ``mlp.experts.local_experts.{local e}``'s
  ``linear_fc1`` ``[gate; up]`` / ``linear_fc2``, split like the dense MLP but over the
  expert-TP group, each expert-parallel rank holding a contiguous range of experts. LoRA
  names them with GLOBAL expert indices (:class:`MoeModule`): Megatron names, HF names
  (both model types' spellings) and PEFT's ``target_parameters`` keys of the fused experts.
* LoRA factors: a column module keeps A replicated and B split by rows; a row module
  keeps A split by columns and B replicated. A per-projection segment's B is a contiguous
  row chunk of the PEFT B; a shared-A B is in the fused layout above.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import torch

ALL_LINEAR = "all-linear"
HF_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: GPTModel's output layer and its HF name (never part of "all-linear", as in PEFT). Its
#: rows are the vocabulary padded to a multiple of TP (:func:`padded_vocab_size`).
OUTPUT_LAYER = "output_layer"
LM_HEAD = "lm_head"
#: GPTModel's word embedding (a VocabParallelEmbedding), its path and its HF projection name;
#: LoRA's A holds the vocabulary (padded like the output layer's rows).
EMBEDDING = "word_embeddings"
EMBEDDING_PATH = "embedding.word_embeddings"
EMBED_TOKENS = "embed_tokens"

#: A layer index as written in keys: ASCII digits without leading zeros, so that no two
#: spellings (``1`` and ``01``, a fullwidth digit) name one layer.
LAYER_INDEX = r"(?:0|[1-9][0-9]*)"
#: Megatron module -> its path inside a transformer layer.
MODULE_PATH = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}
#: HF projection -> (HF parent module, Megatron module).
PROJECTION = {
    "q_proj": ("self_attn", "linear_qkv"),
    "k_proj": ("self_attn", "linear_qkv"),
    "v_proj": ("self_attn", "linear_qkv"),
    "o_proj": ("self_attn", "linear_proj"),
    "gate_proj": ("mlp", "linear_fc1"),
    "up_proj": ("mlp", "linear_fc1"),
    "down_proj": ("mlp", "linear_fc2"),
    LM_HEAD: (None, OUTPUT_LAYER),
    EMBED_TOKENS: ("model", EMBEDDING),
}
COLUMN_MODULES = ("linear_qkv", "linear_fc1", OUTPUT_LAYER)
#: HF prefix of PEFT LoRA tensor keys.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class MoeFacts:
    """The mixture-of-experts dimensions the expert LoRA layouts depend on."""

    num_experts: int
    #: One expert's ffn width (Qwen3-MoE's ``moe_intermediate_size``).
    ffn_hidden_size: int
    #: Global indices of the layers whose MLP is a mixture of experts.
    layers: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict) -> "MoeFacts":
        ok = isinstance(d, dict) and all(type(d.get(k)) is int and d[k] > 0 for k in ("num_experts", "ffn_hidden_size"))
        layers = d.get("layers") if isinstance(d, dict) else None
        if not ok or not isinstance(layers, list) or not all(type(i) is int and i >= 0 for i in layers):
            raise ValueError(f"model facts: moe={d!r} is not {{'num_experts': n, 'ffn_hidden_size': n, 'layers': [i, ...]}}")
        return cls(d["num_experts"], d["ffn_hidden_size"], tuple(layers))

    def segment_shape(self, segment: str, hidden: int) -> tuple[int, int]:
        """(in, out) of an expert or router LoRA segment (TP=1)."""
        f = self.ffn_hidden_size
        return {
            "linear_fc1": (hidden, 2 * f),
            "gate_proj": (hidden, f),
            "up_proj": (hidden, f),
            "linear_fc2": (f, hidden),
            "down_proj": (f, hidden),
            ROUTER: (hidden, self.num_experts),
        }[segment]


@dataclass(frozen=True)
class ModelFacts:
    """The model dimensions every layout depends on (stored in our checkpoints)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    gated_linear_unit: bool
    vocab_size: int
    #: Mixture-of-experts facts (None: a dense model; absent from a dense model's dict).
    moe: Optional[MoeFacts] = None
    #: Multi-latent attention's value head size: its ``linear_proj`` takes heads x v_head_dim
    #: (None: the LLaMA-family attention; absent from its dict). MLA's own linears have no
    #: layout facts: their shapes are checked rank file against rank file.
    v_head_dim: Optional[int] = None

    @classmethod
    def from_transformer_config(cls, cfg, vocab_size: int) -> "ModelFacts":
        moe = None
        if getattr(cfg, "num_moe_experts", None):
            freq = cfg.moe_layer_freq
            pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(cfg.num_layers)]
            moe = MoeFacts(cfg.num_moe_experts, cfg.moe_ffn_hidden_size, tuple(i for i, m in enumerate(pattern) if m))
        return cls(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
            head_dim=cfg.kv_channels,
            ffn_hidden_size=cfg.ffn_hidden_size,
            gated_linear_unit=cfg.gated_linear_unit,
            vocab_size=vocab_size,
            moe=moe,
            v_head_dim=cfg.v_head_dim if getattr(cfg, "multi_latent_attention", False) else None,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFacts":
        """Facts from a dict; ValueError naming the first missing or mistyped field."""
        if not isinstance(d, dict):
            raise ValueError(f"model facts must be an object, got {d!r}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "moe":
                values["moe"] = MoeFacts.from_dict(d["moe"]) if d.get("moe") is not None else None
                continue
            if f.name == "v_head_dim" and f.name not in d:
                continue
            if f.name not in d:
                raise ValueError(f"model facts lack {f.name!r}")
            v = d[f.name]
            ok = isinstance(v, bool) if f.type == "bool" else (type(v) is int and (v > 0 or f.name == "vocab_size"))
            if not ok:
                raise ValueError(f"model facts: {f.name}={v!r} is not a {'boolean' if f.type == 'bool' else 'positive integer'}")
            values[f.name] = v
        return cls(**values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.moe is None:
            del d["moe"]
        else:
            d["moe"]["layers"] = list(self.moe.layers)
        if self.v_head_dim is None:
            del d["v_head_dim"]
        return d

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def check_tp(self, tp: int) -> None:
        """Refuse a TP size that does not divide what megatron-core splits."""
        for field, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("ffn_hidden_size", self.ffn_hidden_size),
            *((("moe ffn_hidden_size", self.moe.ffn_hidden_size),) if self.moe is not None else ()),
        ):
            if value % tp:
                raise ValueError(f"tensor parallel size {tp} does not divide {field}={value}")

    def projections(self, module: str) -> tuple[str, ...]:
        """HF projections fused into a Megatron module."""
        if module == "linear_fc1" and not self.gated_linear_unit:
            return ("up_proj",)
        return tuple(p for p, (_, m) in PROJECTION.items() if m == module)

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in, out) of the full (TP=1) Megatron module."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        f = self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)
        return {
            "linear_qkv": (h, q + 2 * kv),
            "linear_proj": (self.num_attention_heads * (self.v_head_dim or d), h),
            "linear_fc1": (h, f),
            "linear_fc2": (self.ffn_hidden_size, h),
            OUTPUT_LAYER: (h, self.vocab_size),
            EMBEDDING: (self.vocab_size, h),
        }[module]

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(in, out) of an HF projection."""
        h, d = self.hidden_size, self.head_dim
        return {
            "q_proj": (h, self.num_attention_heads * d),
            "k_proj": (h, self.num_query_groups * d),
            "v_proj": (h, self.num_query_groups * d),
            "o_proj": (self.num_attention_heads * d, h),
            "gate_proj": (h, self.ffn_hidden_size),
            "up_proj": (h, self.ffn_hidden_size),
            "down_proj": (self.ffn_hidden_size, h),
            LM_HEAD: (h, self.vocab_size),
            EMBED_TOKENS: (self.vocab_size, h),
        }[proj]

    def segment_geometry(self, module: str, proj: Optional[str], tp: int) -> dict:
        """Rows a segment writes in the TP-local output (see ``megatron_lora.parallel.lora_layers.Segment``).

        ``proj`` None means one shared-A segment over the whole module.
        """
        self.check_tp(tp)
        out_local = self.module_shape(module)[1] // (tp if module in COLUMN_MODULES else 1)
        gated = module == "linear_fc1" and self.gated_linear_unit
        if proj is None or module not in COLUMN_MODULES or (module == "linear_fc1" and not gated):
            return dict(width=out_local, blocks=2 if gated and proj is None else 1)
        if module == "linear_qkv":
            d, p = self.head_dim, self.heads_per_group
            offset, width = {"q_proj": (0, p * d), "k_proj": (p * d, d), "v_proj": ((p + 1) * d, d)}[proj]
            return dict(width=width, groups=self.num_query_groups // tp, period=(p + 2) * d, offset=offset)
        f_local = self.ffn_hidden_size // tp
        return dict(width=f_local, period=2 * f_local, offset=0 if proj == "gate_proj" else f_local)


def hf_module_name(layer: Optional[int], proj: str) -> str:
    """HF name of a projection of global layer ``layer`` (None for ``lm_head``)."""
    if proj == LM_HEAD:
        return LM_HEAD
    if proj == EMBED_TOKENS:
        return f"model.{EMBED_TOKENS}"
    return f"model.layers.{layer}.{PROJECTION[proj][0]}.{proj}"


def megatron_module_name(layer: Optional[int], module: str) -> str:
    """Megatron name of a module of global layer ``layer`` (None outside the layers)."""
    if module == OUTPUT_LAYER:
        return OUTPUT_LAYER
    if module == EMBEDDING:
        return EMBEDDING_PATH
    return f"decoder.layers.{layer}.{MODULE_PATH[module]}"


def vocab_rows(module: str, factor: str, facts: ModelFacts) -> Optional[int]:
    """The real size of a factor's split dim when it is the (padded) vocabulary, else None:
    the output layer's B rows (and DoRA magnitude) and the embedding's A columns, held as
    :func:`padded_vocab_size`."""
    vocab = (module, factor) in ((OUTPUT_LAYER, "lora_B"), (OUTPUT_LAYER, "lora_magnitude_vector"), (EMBEDDING, "lora_A"))
    return facts.vocab_size if vocab else None


def module_style(module: str) -> str:
    """"column" or "row": how a Megatron module of the LLaMA-family layout is split."""
    return "column" if module in COLUMN_MODULES else "row"


def factor_dim(style: str, factor: str) -> Optional[int]:
    """The dim a LoRA factor is split along over TP (None: replicated): a column module
    splits B by rows and replicates A; a row module splits A by columns and replicates B; a
    replicated module (the MoE router) splits neither. A DoRA
    magnitude (``lora_magnitude_vector``, one entry per row of B) is split like B."""
    if style == "column":
        return None if factor == "lora_A" else 0
    if style == "replicated":
        return None
    return 1 if factor == "lora_A" else None


def factor_split(module: str, factor: str, segment: str, facts: ModelFacts) -> tuple[Optional[int], int]:
    """(dim split over TP or None if replicated, blocks) of a LoRA factor of the LLaMA-family
    layout in our checkpoints."""
    dim = factor_dim(module_style(module), factor)
    shared_gated = module == "linear_fc1" and segment == module and dim == 0 and facts.gated_linear_unit
    return dim, 2 if shared_gated else 1


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v rows (for ``groups`` query groups) -> Megatron's interleaved linear_qkv rows."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, 1).reshape(-1, *rest)


def split_qkv(w: torch.Tensor, facts: ModelFacts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` on a full (TP=1) linear_qkv tensor."""
    d, p = facts.head_dim, facts.heads_per_group
    per_group = w.reshape(facts.num_query_groups, (p + 2) * d, *w.shape[1:])
    q, k, v = per_group.split([p * d, d, d], 1)
    return tuple(t.reshape(-1, *w.shape[1:]) for t in (q, k, v))


# --- Base weights (HF checkpoint <-> Megatron GPTModel, local spec) ---------------------------

#: Megatron parameter inside ``decoder.layers.{i}`` -> the HF tensors inside
#: ``model.layers.{i}`` it is made of (several = fused, in Megatron's order).
BASE_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "self_attention.linear_proj.bias": ("self_attn.o_proj.bias",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc1.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "mlp.linear_fc2.bias": ("mlp.down_proj.bias",),
}
#: Megatron parameters outside the layers -> HF tensor.
BASE_GLOBAL_WEIGHTS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
#: Parameters split over TP and along which dim; the rest (norms, row-parallel biases) are
#: replicated. Embedding and output layer are split by (padded) vocabulary rows.
_BASE_SPLIT_DIM = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
}


@dataclass(frozen=True)
class MoeNames:
    """Where an HF mixture-of-experts layer keeps its router and experts on disk.

    ``save_pretrained`` writes one tensor per expert and projection (transformers 5 fuses
    them only in memory): ``model.layers.{i}.{block}.gate.weight`` is the router [experts,
    hidden], ``model.layers.{i}.{block}.experts.{e}.{gate|up|down}.weight`` expert e.
    """

    block: str
    gate: str
    up: str
    down: str


#: HF model_type -> its MoE layer names.
MOE_HF_NAMES = {
    "qwen3_moe": MoeNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
    "mixtral": MoeNames(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
}
#: Prefix of megatron-core's SequentialMLP experts inside ``decoder.layers.{i}``.
MEGATRON_EXPERTS = "mlp.experts.local_experts."
#: megatron-core's router (TopKRouter) of an MoE layer: its path inside ``decoder.layers.{i}``
#: and the one segment a LoRA on it has.
ROUTER = "router"
ROUTER_PATH = "mlp.router"
#: HF projections an expert's Megatron module fuses (``linear_fc1`` is ``[gate; up]``).
EXPERT_PROJECTIONS = {"linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
#: Each projection's field of :class:`MoeNames` (how the model type spells it on disk).
_MOE_FIELD = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
#: PEFT's ``target_parameters`` name of each MoE module as transformers 5 holds it in memory
#: (``mlp.experts.gate_up_proj`` [experts, 2 x ffn, hidden] ..., the router's ``mlp.gate.weight``).
MOE_PARAMETERS = {"linear_fc1": "experts.gate_up_proj", "linear_fc2": "experts.down_proj", ROUTER: "gate.weight"}


@dataclass(frozen=True)
class MoeModule:
    """A LoRA-adaptable module of an MoE layer: an expert's linear_fc1 / linear_fc2 (GLOBAL
    expert index) or the router (``expert`` None)."""

    layer: int
    expert: Optional[int]
    module: str

    @property
    def name(self) -> str:
        """Its Megatron name (global layer and expert indices)."""
        if self.expert is None:
            return f"decoder.layers.{self.layer}.{ROUTER_PATH}"
        return f"decoder.layers.{self.layer}.{MEGATRON_EXPERTS}{self.expert}.{self.module}"

    def projections(self, gated: bool = True) -> tuple[str, ...]:
        """The HF projections its segments may be named for (none for the router)."""
        if self.expert is None:
            return ()
        return EXPERT_PROJECTIONS[self.module] if gated or self.module != "linear_fc1" else ("up_proj",)

    def hf_names(self, segment: str) -> tuple[str, ...]:
        """The HF module names ``target_modules`` matches a segment under, as each supported
        model type spells it (transformers 4 modules, on-disk names): an expert projection
        (``model.layers.{i}.mlp.experts.{e}.gate_proj``, Mixtral's ``block_sparse_moe...w1``), the
        router (``...mlp.gate``); a segment named for the module has its Megatron name only."""
        if self.expert is None:
            return (self.name, *dict.fromkeys(f"model.layers.{self.layer}.{m.block}.gate" for m in MOE_HF_NAMES.values()))
        if segment == self.module:
            return (self.name,)
        return tuple(dict.fromkeys(
            f"model.layers.{self.layer}.{m.block}.experts.{self.expert}.{getattr(m, _MOE_FIELD[segment])}"
            for m in MOE_HF_NAMES.values()))

    @property
    def parameter(self) -> str:
        """PEFT's ``target_parameters`` key of the (fused) parameter it belongs to: LoRA on it
        adapts the whole module of every expert (shared A over ``[gate; up]``)."""
        return f"model.layers.{self.layer}.mlp.{MOE_PARAMETERS[self.module]}"


_MOE_MODULE = re.compile(
    rf"decoder\.layers\.(?P<layer>{LAYER_INDEX})\.(?:(?P<router>{re.escape(ROUTER_PATH)})|"
    rf"{re.escape(MEGATRON_EXPERTS)}(?P<expert>{LAYER_INDEX})\.(?P<module>linear_fc1|linear_fc2))", re.ASCII)


def parse_moe_module(name: str) -> Optional[MoeModule]:
    """The :class:`MoeModule` a Megatron module name (global indices) denotes, else None."""
    m = _MOE_MODULE.fullmatch(name)
    if m is None:
        return None
    if m["router"]:
        return MoeModule(int(m["layer"]), None, ROUTER)
    return MoeModule(int(m["layer"]), int(m["expert"]), m["module"])


def moe_segment_geometry(module: MoeModule, segment: str, out_local: int, gated: bool) -> dict:
    """Rows a segment of an expert's linear (or the router) writes in its local output of
    ``out_local`` rows, split over expert TP like the dense MLP (a gated fc1 is ``[gate_j; up_j]``)."""
    if segment == module.module:  # one LoRA over the module; a gated [gate; up] B splits by halves
        return dict(width=out_local, blocks=2 if gated and module.module == "linear_fc1" else 1)
    if segment not in module.projections(gated):
        raise ValueError(f"{module.name} has no segment {segment!r} (segments: {(module.module, *module.projections(gated))})")
    if module.module == "linear_fc2" or not gated:
        return dict(width=out_local)
    half = out_local // 2
    return dict(width=half, period=out_local, offset=0 if segment == "gate_proj" else half)


def global_expert_path(inner: str, local_expert_indices) -> str:
    """``mlp.experts.local_experts.{local e}...`` inside a layer -> the GLOBAL expert index
    (``local_expert_indices``: the layer's ``mlp.local_expert_indices``); any other path as is."""
    if not inner.startswith(MEGATRON_EXPERTS):
        return inner
    local, _, rest = inner[len(MEGATRON_EXPERTS):].partition(".")
    return f"{MEGATRON_EXPERTS}{local_expert_indices[int(local)]}{'.' + rest if rest else ''}"


def is_expert_parameter(name: str) -> bool:
    """Whether a Megatron parameter belongs to an expert (split over the expert-TP group,
    held by one expert-parallel rank) rather than to the dense model."""
    return f".{MEGATRON_EXPERTS}" in name


def _moe_weight_sources(prefix: str, rest: str, moe: MoeNames) -> Optional[tuple[tuple[str, ...], Optional[int]]]:
    """(HF tensors, TP split dim) of a router or expert parameter ``rest`` of layer ``prefix``;
    None if ``rest`` is neither. Expert indices in ``rest`` are GLOBAL."""
    block = f"{prefix}{moe.block}."
    if rest == "mlp.router.weight":
        return (f"{block}gate.weight",), None
    if not rest.startswith(MEGATRON_EXPERTS):
        return None
    parts = rest[len(MEGATRON_EXPERTS):].split(".")
    if len(parts) != 3 or not re.fullmatch(LAYER_INDEX, parts[0]) or parts[2] not in ("weight", "bias"):
        return None
    expert, module, kind = parts
    hf = f"{block}experts.{expert}."
    if module == "linear_fc1":  # gated: [gate; up], split by rows like a dense fc1
        return (f"{hf}{moe.gate}.{kind}", f"{hf}{moe.up}.{kind}"), 0
    if module == "linear_fc2":
        return (f"{hf}{moe.down}.{kind}",), 1 if kind == "weight" else None
    return None


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rows Megatron holds: the smallest multiple of ``tp`` (VocabParallelEmbedding
    splits rows evenly); the extra rows are zeros and are cut from every logit."""
    return -(-vocab_size // tp) * tp


def base_weight_sources(name: str, tied: bool = False,
                        moe: Optional[MoeNames] = None) -> tuple[tuple[str, ...], Optional[int]]:
    """(HF tensor names, TP split dim or None) of a Megatron base parameter name.

    ``name`` uses GLOBAL layer (and expert) indices. With ``tied`` embeddings the output layer
    (present on the last pipeline stage only) reads the HF embedding. ``moe`` names the
    router and experts of a mixture-of-experts model; an expert's dim is split over the
    expert-TP group (:func:`is_expert_parameter`), the router is replicated.
    """
    if name in BASE_GLOBAL_WEIGHTS:
        source = BASE_GLOBAL_WEIGHTS[name]
        if name == "output_layer.weight" and tied:
            source = BASE_GLOBAL_WEIGHTS["embedding.word_embeddings.weight"]
        return (source,), _BASE_SPLIT_DIM.get(name)
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[3] in BASE_LAYER_WEIGHTS:
        prefix = f"model.layers.{parts[2]}."
        return tuple(prefix + s for s in BASE_LAYER_WEIGHTS[parts[3]]), _BASE_SPLIT_DIM.get(parts[3])
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and moe is not None:
        found = _moe_weight_sources(f"model.layers.{parts[2]}.", parts[3], moe)
        if found is not None:
            return found
    raise ValueError(f"no HF tensor maps to the Megatron parameter {name!r}")


def fuse_base(name: str, parts: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Megatron parameter from its HF parts (each already this rank's slice).

    ``groups`` is the number of query groups the slices hold (for linear_qkv). Gated fc1
    is ``[gate_j; up_j]`` on rank j, which is the concatenation of the two row slices.
    """
    if ".linear_qkv." in name:
        return fuse_qkv(*parts, groups=groups)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def megatron_full_to_hf(full_state_dict: dict, facts: ModelFacts, biases: Optional[tuple[str, ...]] = None,
                        moe: Optional[MoeNames] = None) -> dict:
    """A TP=1 (gathered) Megatron GPTModel state dict -> HF Llama-family tensor names.

    Vocabulary padding rows are dropped; ``output_layer.weight`` is absent with tied
    embeddings, so ``lm_head.weight`` is then absent too (HF ties it on load). Megatron's
    ``_extra_state`` entries are skipped. ``biases`` (HF projections that have one, e.g.
    ``hf_import.hf_biases``) drops the zero biases Megatron has and the HF model lacks.
    ``moe`` (:data:`MOE_HF_NAMES`) names the router and experts (expert indices global, as
    at expert-parallel size 1).
    """
    out = {}
    for name, t in full_state_dict.items():
        if name.endswith("_extra_state"):
            continue
        sources, _ = base_weight_sources(name, moe=moe)
        if biases is not None and name.endswith(".bias") and sources[0].split(".")[-2] not in biases:
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[: facts.vocab_size]
        if ".linear_qkv." in name:
            pieces = split_qkv(t, facts)
        elif len(sources) == 2:  # gated fc1 at TP=1: [gate; up]
            pieces = t.chunk(2, 0)
        else:
            pieces = (t,)
        out.update(zip(sources, pieces))
    return out


# --- LoRA factors: HF PEFT module names <-> Megatron segments ------------------------------




def parse_hf_module_name(name: str) -> tuple[Optional[int], str]:
    """(global layer, projection) of ``model.layers.{i}.<parent>.<proj>`` (None, ``lm_head``)
    of ``lm_head``; ValueError otherwise."""
    if name == LM_HEAD:
        return None, LM_HEAD
    if name == hf_module_name(None, EMBED_TOKENS):
        return None, EMBED_TOKENS
    parts = name.split(".")
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and re.fullmatch(LAYER_INDEX, parts[2]):
        layer, parent, proj = int(parts[2]), parts[3], parts[4]
        if proj in PROJECTION and PROJECTION[proj][0] == parent:
            return layer, proj
    raise ValueError(
        f"{name!r} is not a linear projection of a LLaMA-family layer "
        f"(model.layers.N.self_attn|mlp.{{{','.join(HF_PROJECTIONS)}}}, N without leading zeros), model.embed_tokens or lm_head"
    )


def split_shared_b(module: str, b: torch.Tensor, facts: ModelFacts) -> dict[str, torch.Tensor]:
    """A shared-A segment's full (TP=1) B -> the B of each HF projection it covers.

    With A duplicated, these per-projection LoRAs compute exactly the shared one: the rows
    of linear_qkv de-interleave with :func:`split_qkv`, gated fc1's ``[gate; up]`` halves.
    """
    projections = facts.projections(module)
    if module == "linear_qkv":
        pieces = split_qkv(b, facts)
    elif len(projections) == 2:
        pieces = b.chunk(2, 0)
    else:
        pieces = (b,)
    return dict(zip(projections, pieces))


def segment_projection(module: str, segment: str, facts: ModelFacts) -> str:
    """The HF projection a LoRA segment adapts (X-LoRA gives each one its own layer index).

    A per-projection segment is named for it; a shared-A segment (named for its Megatron
    module) qualifies only when the module fuses a single projection.
    """
    if module in (OUTPUT_LAYER, EMBEDDING):
        raise ValueError(f"X-LoRA mixes the LoRAs of the layers' linear projections: an expert on {module} is not supported")
    if segment in HF_PROJECTIONS:
        return segment
    projections = facts.projections(module)
    if segment != module or len(projections) != 1:
        raise ValueError(
            f"segment {segment!r} of {module} spans projections {list(projections)}: X-LoRA needs "
            f"one LoRA per HF projection (convert the shared-A adapter to per-projection segments)"
        )
    return projections[0]


# --- LoRA on mixtures of experts: PEFT's two layouts -------------------------------------------
#
# Ours: :class:`MoeModule` (every expert under its GLOBAL index, the router).
# PEFT, per expert (transformers 4): ``model.layers.{i}.{block}.experts.{e}.{gate|up|down}`` and
# the router ``{block}.gate`` (:data:`MOE_HF_NAMES`).
# PEFT, fused (transformers 5, ``target_parameters``): one LoRA per parameter
# ``model.layers.{i}.mlp.experts.gate_up_proj`` / ``down_proj`` over all experts
# (:func:`fuse_experts`), and the router's ``mlp.gate.weight`` (``MoeModule.parameter``).

#: PEFT's two layouts of expert LoRAs: transformers 5's fused experts through
#: ``target_parameters``, transformers 4's per-expert modules.
MOE_LAYOUTS = ("fused", "per-expert")
#: transformers 5's module holding the fused expert parameters (Mixtral's ``block_sparse_moe``
#: is ``mlp`` there). PEFT wraps the targeted parameters of one module in the order the module
#: defines them (:data:`MOE_PARAMETERS`: gate_up_proj, then down_proj), the first innermost:
#: its keys are ``mlp.experts.base_layer.lora_A`` (gate_up_proj) and ``mlp.experts.lora_A``.
FUSED_EXPERTS = "mlp.experts"
#: The expert modules in that order.
EXPERT_MODULES = tuple(m for m in MOE_PARAMETERS if m != ROUTER)


def moe_hf_name(module: MoeModule, segment: str, names: MoeNames) -> str:
    """transformers 4's module name of a projection segment of an expert (or of the router),
    as ``names`` spell it."""
    block = f"model.layers.{module.layer}.{names.block}"
    if module.module == ROUTER:
        return f"{block}.gate"
    return f"{block}.experts.{module.expert}.{getattr(names, _MOE_FIELD[segment])}"


def parse_moe_hf_name(name: str) -> Optional[tuple[MoeModule, str]]:
    """(module, segment) of a transformers 4 expert projection or router module name in any
    model's spelling (:data:`MOE_HF_NAMES`), else None."""
    for names in MOE_HF_NAMES.values():
        leaves = {getattr(names, field): proj for proj, field in _MOE_FIELD.items()}
        m = re.fullmatch(rf"model\.layers\.({LAYER_INDEX})\.{re.escape(names.block)}\.(?:gate|experts\.({LAYER_INDEX})\.(\w+))", name)
        if m is None or (m[3] is not None and m[3] not in leaves):
            continue
        if m[2] is None:
            return MoeModule(int(m[1]), None, ROUTER), ROUTER
        proj = leaves[m[3]]
        return MoeModule(int(m[1]), int(m[2]), next(k for k, v in EXPERT_PROJECTIONS.items() if proj in v)), proj
    return None


def moe_factor_split(module: MoeModule, factor: str, segment: str) -> tuple[Optional[int], int]:
    """(dim split or None if replicated, blocks) of a LoRA factor of an expert (split like
    the dense MLP's) or the router (replicated) in our checkpoints."""
    if module.module == ROUTER:
        return None, 1
    dim = factor_dim(module_style(module.module), factor)
    return dim, 2 if module.module == "linear_fc1" and segment == module.module and dim == 0 else 1


def fuse_experts(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert (A_e [r, in], B_e [out, r]) -> PEFT's fused (A [E*r, in], B [out, E*r]).

    PEFT reshapes A as (E, r, in) but B as (out, r, E): expert e owns A's rows e*r ..
    e*r + r - 1 and B's columns e, e + E, ..., e + (r - 1) E.
    """
    a = torch.cat([a for a, _ in factors], 0)
    b = torch.stack([b for _, b in factors], 2)
    return a, b.reshape(b.shape[0], -1)


def expert_factor(t: torch.Tensor, factor: str, experts: int, expert: int) -> torch.Tensor:
    """Expert ``expert``'s A (``factor`` lora_A) or B of a fused factor ``t`` (inverse of
    :func:`fuse_experts`)."""
    if factor == "lora_A":
        r = t.shape[0] // experts
        return t[expert * r:(expert + 1) * r].contiguous()
    return t[:, expert::experts].contiguous()


def stack_lora(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAs of equal scaling on stacked output rows (gate, up) -> one LoRA over all the rows:
    A stacked, B block-diagonal (how PEFT fuses transformers 4's w1 / w3 adapters)."""
    return torch.cat([a for a, _ in factors], 0), torch.block_diag(*[b for _, b in factors])


def split_block_diagonal(a: torch.Tensor, b: torch.Tensor, parts: int) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inverse of :func:`stack_lora` for ``parts`` equal ranks and rows: None unless every
    off-diagonal block of ``b`` is exactly zero."""
    r, rows = a.shape[0], b.shape[0]
    if r % parts or rows % parts:
        return None
    r, rows = r // parts, rows // parts
    out = []
    for i in range(parts):
        block_rows = b[i * rows:(i + 1) * rows]
        off = torch.cat([block_rows[:, :i * r], block_rows[:, (i + 1) * r:]], 1)
        if torch.count_nonzero(off):
            return None
        out.append((a[i * r:(i + 1) * r].contiguous(), block_rows[:, i * r:(i + 1) * r].contiguous()))
    return out


def peft_module_names(facts: ModelFacts, names: Optional[MoeNames] = None) -> dict[str, Optional[int]]:
    """Every HF module name a PEFT LoRA config can adapt in a model of ``facts`` -> its
    layer (the dense MLP only in dense layers); with ``names`` also transformers 4's expert
    projections and routers."""
    moe = facts.moe
    moe_layers = set(moe.layers) if moe is not None else set()
    every: dict[str, Optional[int]] = {hf_module_name(None, p): None for p in (EMBED_TOKENS, LM_HEAD)}
    for layer in range(facts.num_layers):
        every |= {hf_module_name(layer, p): layer for p in HF_PROJECTIONS
                  if not (layer in moe_layers and PROJECTION[p][0] == "mlp")}
        if names is not None and layer in moe_layers:
            for module in moe_modules(layer, moe.num_experts):
                every |= {moe_hf_name(module, s, names): layer for s in module.projections() or (ROUTER,)}
    return every


def moe_modules(layer: int, experts: int) -> list[MoeModule]:
    """Every expert module and the router of an MoE layer."""
    return [MoeModule(layer, None, ROUTER)] + [MoeModule(layer, e, m) for e in range(experts) for m in EXPERT_MODULES]
