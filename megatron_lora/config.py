"""LoRA configuration with PEFT's field names, defaults and matching rules."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megatron_lora.hf.layout import ALL_LINEAR, HF_PROJECTIONS, OUTPUT_LAYER, ROUTER, MoeModule

#: PEFT's default targets for the LLaMA family when ``target_modules`` is None.
DEFAULT_TARGETS = ["q_proj", "v_proj"]


@dataclass
class LoraConfig:
    """LoRA options, named and defaulted as in ``peft.LoraConfig``."""

    #: LoRA rank.
    r: int = 8
    #: Scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora).
    lora_alpha: float = 8
    #: Dropout on the LoRA input (training only).
    lora_dropout: float = 0.0
    #: Module names matched against each parallel linear's dotted name (exact or whole
    #: trailing components): Megatron names (``linear_qkv``, ``linear_q_down_proj`` ...: one
    #: LoRA per module, shared A on a fused one), HF projection names where the LLaMA-family
    #: layout is known (``q_proj`` ... ``down_proj``: one LoRA per projection),
    #: ``"all-linear"``, or a regex string matched in full against either name.
    target_modules: Optional[Union[list[str], str]] = None
    #: PEFT's ``target_parameters`` (names matched, exact or as whole trailing components,
    #: against ``<module>.<parameter>`` as transformers 5 holds an MoE layer): ``gate_up_proj``
    #: / ``down_proj`` (``mlp.experts.gate_up_proj`` ...) adapt every expert's linear_fc1 /
    #: linear_fc2 with one LoRA each (shared A over ``[gate; up]``), ``gate.weight`` the router.
    #: As in PEFT, ``layers_to_transform`` and ``exclude_modules`` do not apply to them.
    target_parameters: Optional[list[str]] = None
    #: Modules to leave out (same matching as target_modules).
    exclude_modules: Optional[Union[list[str], str]] = None
    #: Rank-stabilised scaling lora_alpha / sqrt(r).
    use_rslora: bool = False
    #: True: A kaiming-uniform, B zero; "gaussian": A normal(0, 1/r), B zero; False: both random.
    init_lora_weights: Union[bool, str] = True
    #: Global layer indices to adapt (list targets only, as in PEFT).
    layers_to_transform: Optional[Union[list[int], int]] = None
    #: Name of the numbered module list whose index layers_to_transform selects (PEFT's rule;
    #: None: the first numbered component after another component).
    layers_pattern: Optional[Union[list[str], str]] = None
    #: Per-module rank overrides: key regex matched as ``(.*\.)?(key)$``, first match wins.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    #: Per-module alpha overrides, matched like rank_pattern.
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    #: Unsupported PEFT options, accepted only at their defaults.
    bias: str = "none"
    use_dora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        _check_positive_rank("r", self.r)
        for key, r in self.rank_pattern.items():
            _check_positive_rank(f"rank_pattern[{key!r}]", r)
        _check_alpha("lora_alpha", self.lora_alpha)
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", alpha)
        # A regex that does not compile would otherwise fail at the first match.
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                _check_regex(f"{name}={value!r}", value)
            elif value is not None and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
                raise ValueError(f"{name} must be a list of names or a regex string, got {value!r}")
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        tp = self.target_parameters
        if tp is not None and not (isinstance(tp, list) and all(isinstance(t, str) for t in tp)):
            raise ValueError(f"target_parameters must be a list of parameter names, got {tp!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                _check_regex(f"{name} key {key!r}", rf"(.*\.)?({key})$")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got lora_dropout={self.lora_dropout}")
        unsupported = {
            "bias": (self.bias, "none"),
            "use_dora": (self.use_dora, False),
            "fan_in_fan_out": (self.fan_in_fan_out, False),
            "modules_to_save": (self.modules_to_save or None, None),
        }
        for name, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(f"{name}={value!r} is not supported (only {default!r})")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported (True, False, 'gaussian')"
            )
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
        if patterns is not None and not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
            raise ValueError(f"layers_pattern must be a name or a list of names, got {self.layers_pattern!r}")

    # -- resolution (PEFT's rules) ---------------------------------------------------------
    def target_list(self) -> Optional[list[str]]:
        """The list form of target_modules, or None for a regex string."""
        if self.target_modules == ALL_LINEAR:
            return list(HF_PROJECTIONS)
        if isinstance(self.target_modules, str):
            return None
        return list(self.target_modules)

    def matches(self, name: str, layer: Optional[int] = None, any_linear: bool = False) -> bool:
        """Whether the module ``name`` (HF or Megatron, global layer indices) is adapted.

        ``layer``: the global layer index when the caller knows it (the enclosing
        TransformerLayer's), else PEFT's rule finds it in ``name``. ``any_linear``: ``name``
        is a parallel linear outside the known HF layout, which ``"all-linear"`` covers
        unless it is the output layer (PEFT never adapts the output embedding that way).
        """
        if _matches(self.exclude_modules, name):
            return False
        if any_linear and self.target_modules == ALL_LINEAR:
            return name.rsplit(".", 1)[-1] != OUTPUT_LAYER
        targets = self.target_list()
        if targets is None:
            return re.fullmatch(self.target_modules, name) is not None
        if not any(name == t or name.endswith("." + t) for t in targets):
            return False
        if self.layers_to_transform is None:
            return True
        if layer is None:
            layer = self.layer_index(name)
        return layer is not None and layer in self.layers_to_transform

    def matches_any(self, names: tuple[str, ...], layer: Optional[int] = None, any_linear: bool = False) -> Optional[str]:
        """The first of ``names`` (spellings of one module) that the targets match, None if
        none does or any is excluded."""
        if any(_matches(self.exclude_modules, n) for n in names):
            return None
        return next((n for n in names if self.matches(n, layer, any_linear)), None)

    def matches_parameter(self, key: str) -> bool:
        """Whether ``target_parameters`` names the parameter ``key`` (PEFT's rule)."""
        return any(key == t or key.endswith("." + t) for t in self.target_parameters or ())

    def moe_segment_name(self, module: MoeModule, segment: str) -> Optional[str]:
        """The name segment ``segment`` of an MoE module is adapted under (its rank_pattern /
        alpha_pattern key matches against it), None where the config does not adapt it.

        A projection segment of an expert matches by its HF names; a segment named for its
        module by the Megatron name or, through ``target_parameters``, by its fused parameter;
        the router (the one segment ``router``) by its Megatron or HF name (``"all-linear"``
        includes it, as PEFT's does) or its parameter ``gate.weight``.
        """
        if segment not in (module.module, *module.projections()):
            return None
        name = self.matches_any(module.hf_names(segment), module.layer, any_linear=module.module == ROUTER)
        if name is None and segment == module.module and self.matches_parameter(module.parameter):
            name = module.parameter
        return name

    def layer_index(self, name: str) -> Optional[int]:
        """The layer index PEFT reads from a module name for ``layers_to_transform``: the
        first number after ``layers_pattern`` (or, without one, after any component)."""
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            m = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)), None)
        return None if m is None else int(m["idx"])

    def rank_alpha(self, name: str) -> tuple[int, float]:
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha)
        return r, alpha

    def scaling(self, name: str) -> float:
        r, alpha = self.rank_alpha(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """Build from a dict (ours or a PEFT adapter_config.json).

        PEFT bookkeeping fields are ignored; any other unknown field set to a non-default
        value (``lora_bias``, ``trainable_token_indices``, ...) is refused by name.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in names and k not in _BOOKKEEPING_FIELDS and v not in (None, False, [], {}, ""):
                raise ValueError(f"unsupported LoRA config field {k}={v!r}")
        return cls(**{k: v for k, v in d.items() if k in names})


#: PEFT config fields that never change the math of a LoRA or an X-LoRA.
_BOOKKEEPING_FIELDS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision",
    "inference_mode", "peft_version", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "runtime_config", "qalora_group_size", "ensure_weight_tying",
    "arrow_config", "lora_ga_config", "bdlora_config",
}


def _check_positive_rank(field_name: str, r: Any) -> None:
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"{field_name} must be a positive integer, got {r!r}")


def _check_alpha(field_name: str, alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{field_name} must be a finite number, got {alpha!r}")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} is not a valid regex ({e})") from None


def _matches(spec: Optional[Union[list[str], str]], name: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + s) for s in spec)


def _pattern_key(patterns: dict, name: str) -> Optional[str]:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass
class XLoraConfig:
    """X-LoRA options, named and defaulted as in ``peft.XLoraConfig``."""

    #: Hidden size of the base model (None: taken from the model).
    hidden_size: Optional[int] = None
    #: Expert name -> LoRA directory (PEFT LoRA or megatron-lora checkpoint); expert i is
    #: the i-th entry.
    adapters: dict[str, str] = field(default_factory=dict)
    #: Softmax over the experts of the classifier's output.
    enable_softmax: bool = True
    #: Softmax over the experts kept by top_k_lora (no temperature).
    enable_softmax_topk: bool = False
    #: One scaling per X-LoRA layer (True) or one broadcast to every layer (False).
    layerwise_scalings: bool = False
    #: Number of linears of the classifier.
    xlora_depth: int = 1
    #: Hidden size of the classifier (xlora_depth >= 2).
    xlora_size: int = 2048
    #: Dropout after each hidden linear of the classifier (xlora_depth >= 2).
    xlora_dropout_p: float = 0.2
    #: Train the experts along with the classifier.
    use_trainable_adapters: bool = False
    #: Temperature of the enable_softmax softmax.
    softmax_temperature: float = 1.0
    #: Keep only the k largest scalings per token and layer (None: all).
    top_k_lora: Optional[int] = None
    #: Scalings of the scaling pass (None: 1 / n_experts, stored as that number).
    scaling_pass_value: Optional[float] = 0.0
    #: Factor on every expert's output.
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.xlora_depth < 1:
            raise ValueError(f"xlora_depth must be at least 1, got {self.xlora_depth}")
        if self.xlora_depth > 1 and self.xlora_size < 1:
            raise ValueError(f"xlora_size must be positive, got {self.xlora_size}")
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ValueError(f"xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p}")
        if self.top_k_lora is not None and self.top_k_lora < 1:
            raise ValueError(f"top_k_lora must be at least 1 or None, got {self.top_k_lora}")
        if self.softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be positive, got {self.softmax_temperature}")
        self.adapters = dict(self.adapters or {})

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": "XLORA", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XLoraConfig":
        """Build from a dict (ours or a PEFT X-LoRA adapter_config.json).

        PEFT bookkeeping fields are ignored; any other unknown field is refused by name.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in names and k not in _BOOKKEEPING_FIELDS:
                raise ValueError(f"unsupported X-LoRA config field {k}={v!r}")
        if d.get("peft_type", "XLORA") != "XLORA":
            raise ValueError(f"not an X-LoRA config: peft_type={d['peft_type']!r}")
        return cls(**{k: v for k, v in d.items() if k in names})
