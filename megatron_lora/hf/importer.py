"""Hugging Face base models (Llama, Mistral, Qwen2/2.5, Qwen3; Qwen3-MoE, Mixtral) -> megatron-core
GPTModel at any TP (and, for mixtures of experts, any expert-parallel / expert-TP size).

Every HF config field that changes the logits is carried into the TransformerConfig or
refused by name. Weights are read with safetensors slicing, so each rank reads only the
rows / columns it holds (memory per rank ~ model size / TP), and of the experts only those
of its expert-parallel rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from safetensors import SafetensorError

from megatron_lora.formats.files import open_safetensors, read_json
from megatron_lora.model.gpt import build_gpt, gpt_config
from megatron_lora.hf.layout import (
    MEGATRON_EXPERTS,
    MOE_HF_NAMES,
    ModelFacts,
    MoeFacts,
    MoeNames,
    base_weight_sources,
    fuse_base,
    global_expert_path,
    is_expert_parameter,
)
from megatron_lora.parallel.device import device
from megatron_lora.parallel.cpu import cuda_on_cpu

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
#: Model types refused with a reason of their own.
_REFUSED_MODEL_TYPES = {
    "qwen2_moe": "its shared experts are not supported",
}
#: Fields of no supported model type that would change the math if set.
_REFUSED_FIELDS = ("quantization_config", "attn_logit_softcapping", "final_logit_softcapping")
#: megatron-core's RotaryEmbedding applies llama3 scaling with these fixed parameters.
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


#: HF config fields every supported model has (the model facts come from them).
_REQUIRED_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def read_hf_config(hf_dir: str | Path) -> dict:
    """config.json of an HF model directory, with the fields the model facts need checked."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no HF config.json (is {hf_dir} an HF model directory?)")
    cfg = read_json(path)
    for name in _REQUIRED_FIELDS:
        value = cfg.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {name} is {'missing' if name not in cfg else f'{value!r}'}; "
                             "expected a positive integer")
    return cfg


def _model_type(hf_config: dict) -> str:
    model_type = hf_config.get("model_type")
    if model_type in _REFUSED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported: {_REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def hf_model_facts(hf_config: dict) -> ModelFacts:
    """The model facts of an HF config (real, unpadded vocabulary)."""
    model_type = _model_type(hf_config)
    heads = hf_config["num_attention_heads"]
    # Qwen3's head_dim defaults to 128, the others' to hidden / heads.
    default_head_dim = 128 if model_type == "qwen3" else hf_config["hidden_size"] // heads
    return ModelFacts(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or default_head_dim,
        ffn_hidden_size=hf_config["intermediate_size"],
        gated_linear_unit=True,
        vocab_size=hf_config["vocab_size"],
        moe=_moe_facts(hf_config, model_type),
    )


def _moe_facts(hf_config: dict, model_type: str) -> Optional[MoeFacts]:
    """The mixture-of-experts facts of an HF config (None for a dense model)."""
    moe = _moe_config(hf_config, model_type, 1, 1, 0.0)  # the layout and loss do not change the facts
    if not moe:
        return None
    layers = tuple(i for i, sparse in enumerate(moe["moe_layer_freq"]) if sparse)
    return MoeFacts(moe["num_moe_experts"], moe["moe_ffn_hidden_size"], layers)


def hf_biases(hf_config: dict) -> tuple[str, ...]:
    """The HF projections that have a bias (as each model class builds them)."""
    model_type = _model_type(hf_config)
    if model_type == "qwen2":
        return ("q_proj", "k_proj", "v_proj")
    if model_type in ("mistral", "mixtral"):
        return ()
    attention = ("q_proj", "k_proj", "v_proj", "o_proj") if hf_config.get("attention_bias") else ()
    mlp = ("gate_proj", "up_proj", "down_proj") if model_type == "llama" and hf_config.get("mlp_bias") else ()
    return attention + mlp


def _rope(hf_config: dict) -> dict:
    """build_gpt's RoPE kwargs: theta, and llama3 scaling (the only scaling megatron-core has)."""
    # transformers 5 writes ``rope_parameters`` (theta inside); older configs ``rope_theta`` +
    # ``rope_scaling``.
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (rotary on the full head_dim only)")
    kwargs = dict(rotary_base=float(theta))
    if rope_type == "llama3":
        for key, value in _MEGATRON_LLAMA3.items():
            if params.get(key) != value:
                raise ValueError(
                    f"rope_scaling llama3 with {key}={params.get(key)} is not supported: "
                    f"megatron-core's RotaryEmbedding fixes it to {value}"
                )
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif rope_type != "default":
        raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported (only 'default' and 'llama3')")
    return kwargs


def _max_sequence_length(hf_config: dict, model_type: str) -> int:
    """Longest sequence we compute exactly: a sliding window caps it (below the window,
    sliding-window attention is plain causal attention)."""
    max_len = hf_config.get("max_position_embeddings", 4096)
    window = hf_config.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        layer_types = hf_config.get("layer_types") or []
        sliding = hf_config.get("use_sliding_window") or "sliding_attention" in layer_types
        window = window if sliding else None
    if window is not None:
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"sliding_window={window!r} is not a positive integer")
        max_len = min(max_len, window)
    return max_len


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config field {name}={value!r}: expected a positive integer")
    return value


def _moe_config(hf_config: dict, model_type: str, ep: int, etp: int, aux_loss_coeff: float) -> dict:
    """TransformerConfig fields of an HF mixture of experts (empty for a dense model), its
    experts split over ``ep`` expert-parallel ranks and ``etp`` expert-TP ranks.

    Routing: HF takes the top-k of softmax(router logits) and, with ``norm_topk_prob``
    (always for Mixtral), renormalises them; megatron-core's default (softmax over the top-k
    logits) is exactly that renormalised softmax, and ``moe_router_pre_softmax`` (softmax over
    all, then top-k) the unnormalised one. No token is dropped (no capacity factor) and the
    ``allgather`` dispatcher runs everywhere. The auxiliary loss fields
    (``router_aux_loss_coef``, ``output_router_logits``) do not change logits and are left to
    fine-tuning: ``aux_loss_coeff`` > 0 turns on megatron-core's micro-batch load-balancing
    loss (``moe_router_load_balancing_type="aux_loss"``) with that coefficient. Mixtral's
    training-time ``router_jitter_noise`` (which scales the experts' input too, unlike
    megatron-core's router-only jitter) is refused.
    """
    if model_type not in MOE_HF_NAMES:
        if aux_loss_coeff:
            raise ValueError(f"an auxiliary load-balancing loss needs a mixture-of-experts base, "
                             f"not model_type={model_type!r}")
        return {}
    if not aux_loss_coeff >= 0:
        raise ValueError(f"the auxiliary load-balancing loss coefficient must be >= 0, got {aux_loss_coeff}")
    experts = hf_config.get("num_local_experts", hf_config.get("num_experts"))
    if "num_experts" in hf_config and hf_config["num_experts"] != experts:
        raise ValueError(f"config fields num_experts={hf_config['num_experts']!r} and "
                         f"num_local_experts={experts!r} disagree")
    experts = _positive_int("num_experts", experts)
    topk = _positive_int("num_experts_per_tok", hf_config.get("num_experts_per_tok"))
    if topk > experts:
        raise ValueError(f"num_experts_per_tok={topk} exceeds the {experts} experts")
    if hf_config.get("attention_bias"):
        # Megatron's one bias switch would give the experts (zero) biases too: untested.
        raise ValueError(f"attention_bias=True is not supported for model_type={model_type!r}")
    if experts % ep:
        raise ValueError(f"num_experts={experts} does not divide by expert_model_parallel_size={ep}")
    layers = hf_config["num_hidden_layers"]
    if model_type == "mixtral":
        if hf_config.get("router_jitter_noise"):
            raise ValueError(f"router_jitter_noise={hf_config['router_jitter_noise']!r} is not supported (only 0)")
        ffn, normalize, pattern = hf_config["intermediate_size"], True, [1] * layers
    else:  # qwen3_moe: layers in mlp_only_layers, or off the sparse step, are dense MLPs
        ffn = _positive_int("moe_intermediate_size", hf_config.get("moe_intermediate_size"))
        normalize = bool(hf_config.get("norm_topk_prob", False))
        step = _positive_int("decoder_sparse_step", hf_config.get("decoder_sparse_step", 1))
        dense = set(hf_config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    if topk == 1 and normalize:
        # megatron-core refuses a top-1 softmax over the chosen logit; its value is 1.
        raise ValueError("num_experts_per_tok=1 with normalised top-k probabilities is not supported")
    return dict(
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=ffn,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not normalize,
        moe_layer_freq=pattern,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none",
        moe_aux_loss_coeff=float(aux_loss_coeff),
        # Read by the expert layers: under EP they leave the collectives to the dispatcher
        # and mark their weights for the expert data-parallel gradient reduction.
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def transformer_config_from_hf(
    hf_config: dict, tp: int, pp: int = 1, dtype: torch.dtype = torch.float32,
    ep: int = 1, etp: Optional[int] = None, sequence_parallel: bool = False, moe_aux_loss_coeff: float = 0.0,
) -> tuple[TransformerConfig, dict]:
    """(TransformerConfig, build_gpt kwargs) of an HF Llama / Mistral / Qwen2 / Qwen3 /
    Qwen3-MoE / Mixtral config (experts over ``ep`` expert-parallel and ``etp`` expert-TP
    ranks, None: ``tp``; a dense model ignores both), with megatron-core's
    ``sequence_parallel`` (needs ``tp`` > 1) and, for a mixture of experts, its auxiliary
    load-balancing loss coefficient ``moe_aux_loss_coeff`` (0: none).

    The vocabulary is padded to a multiple of ``tp`` in the kwargs. Parameters are left
    uninitialised (``perform_initialization=False``): they are about to be loaded.
    """
    model_type = _model_type(hf_config)
    for field in _REFUSED_FIELDS:
        if hf_config.get(field):
            raise ValueError(f"config field {field}={hf_config[field]!r} is not supported")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config['hidden_act']!r} is not supported (only 'silu')")
    facts = hf_model_facts(hf_config)
    facts.check_tp(tp)
    biases = hf_biases(hf_config)
    qkv_bias = "q_proj" in biases
    config = gpt_config(
        num_layers=facts.num_layers,
        hidden_size=facts.hidden_size,
        num_attention_heads=facts.num_attention_heads,
        ffn_hidden_size=facts.ffn_hidden_size,
        num_query_groups=facts.num_query_groups,
        kv_channels=facts.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        # Megatron has one bias switch for all linears (+ one for qkv): a bias it has and HF
        # lacks is loaded as zeros, which is exact.
        add_bias_linear=bool(set(biases) - {"q_proj", "k_proj", "v_proj"}),
        add_qkv_bias=qkv_bias,
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        perform_initialization=False,
        sequence_parallel=sequence_parallel,
        **_moe_config(hf_config, model_type, ep, etp or tp, moe_aux_loss_coeff),
    )
    kwargs = dict(
        vocab_size=facts.vocab_size,
        max_sequence_length=_max_sequence_length(hf_config, model_type),
        share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
        **_rope(hf_config),
    )
    return config, kwargs


def eos_token_ids(hf_dir: str | Path) -> list[int]:
    """EOS ids as HF's generate uses them: generation_config.json first, then config.json."""
    hf_dir = Path(hf_dir)
    for name in ("generation_config.json", "config.json"):
        path = hf_dir / name
        if path.is_file():
            eos = read_json(path).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [eos]
    return []


class SafetensorsCheckpoint:
    """The tensors of an HF model directory: one ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``. Opens each file once, lazily; reads slices."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            self.file_of = {name: hf_dir / f for name, f in weight_map.items()}
        elif single.is_file():
            self.file_of = {name: single for name in open_safetensors(single).keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
        # Open every file now (headers only, memory-mapped) so a missing, corrupt or
        # truncated file is reported before any model is built.
        self._handles = {}
        for path in sorted(set(self.file_of.values())):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {index.name} but missing")
            self._handles[path] = open_safetensors(path)

    def slice(self, name: str):
        """A lazy slice object (``get_shape()``, ``[a:b]``) of tensor ``name``."""
        if name not in self.file_of:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint")
        path = self.file_of[name]
        try:
            return self._handles[path].get_slice(name)
        except SafetensorError as e:
            raise ValueError(f"{path}: cannot read tensor {name!r} ({e})") from e


def _local_part(ckpt: SafetensorsCheckpoint, name: str, dim: Optional[int], rank: int, tp: int,
                rows: Optional[int] = None) -> torch.Tensor:
    """This rank's slice of HF tensor ``name`` split along ``dim`` (None: all of it), on
    this rank's device: only the slice is read from the memory-mapped file and copied over.

    ``rows`` (vocabulary tensors) is the padded row count: rows past the HF tensor are zeros.
    """
    sl = ckpt.slice(name)
    shape = sl.get_shape()
    if dim is None:
        return sl[:].to(device())
    total = rows or shape[dim]
    if total % tp:
        raise ValueError(f"tensor {name!r} of shape {tuple(shape)}: dim {dim} does not divide by TP={tp}")
    lo, hi = rank * total // tp, (rank + 1) * total // tp
    lo_in, hi_in = min(lo, shape[dim]), min(hi, shape[dim])
    part = (sl[lo_in:hi_in] if dim == 0 else sl[:, lo_in:hi_in]).to(device())
    if part.shape[dim] < hi - lo:  # vocabulary padding (dim 0)
        pad = torch.zeros(hi - lo - part.shape[0], *part.shape[1:], dtype=part.dtype, device=part.device)
        part = torch.cat([part, pad])
    return part


def _global_name(model: GPTModel, name: str) -> str:
    """``decoder.layers.{stage-local i}`` -> global layer index (pipeline stages), and
    ``mlp.experts.local_experts.{local e}`` -> global expert index (expert parallelism)."""
    parts = name.split(".", 3)
    if parts[:2] == ["decoder", "layers"]:
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if parts[3].startswith(MEGATRON_EXPERTS):
            parts[3] = global_expert_path(parts[3], layer.mlp.local_expert_indices)
    return ".".join(parts)


@torch.no_grad()
def load_base_weights(model: GPTModel, ckpt: SafetensorsCheckpoint, facts: ModelFacts,
                      biases: tuple[str, ...], tied: bool, moe: Optional[MoeNames] = None) -> None:
    """Copy this rank's slices of the HF weights into ``model``'s parameters (experts, named
    by ``moe``: this expert-parallel rank's experts, split over the expert-TP group)."""
    for local_name, param in model.named_parameters():
        name = _global_name(model, local_name)
        sources, dim = base_weight_sources(name, tied=tied, moe=moe)
        if is_expert_parameter(name):
            rank, tp = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
        else:
            rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        if name.endswith(".bias") and sources[0].split(".")[-2] not in biases:
            param.zero_()  # Megatron bias the HF model does not have
            continue
        vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
        if vocab and ckpt.slice(sources[0]).get_shape()[0] != facts.vocab_size:
            raise ValueError(f"{sources[0]} has {ckpt.slice(sources[0]).get_shape()[0]} rows, "
                             f"config vocab_size={facts.vocab_size}")
        parts = [_local_part(ckpt, s, dim, rank, tp, param.shape[0] * tp if vocab else None) for s in sources]
        try:
            value = fuse_base(name, parts, facts.num_query_groups // tp)
        except RuntimeError as e:
            raise ValueError(f"{name}: HF tensors {sources} do not fit the config ({e})") from e
        if value.shape != param.shape:
            raise ValueError(f"{name}: HF tensors {sources} give shape {tuple(value.shape)}, "
                             f"the model expects {tuple(param.shape)}")
        param.copy_(value)


def load_hf_base(hf_dir: str | Path, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                 moe_aux_loss_coeff: float = 0.0) -> tuple[GPTModel, ModelFacts]:
    """Build the GPTModel of an HF model directory (on this rank's device, SDPA attention)
    and load this rank's weights (``sequence_parallel``, ``moe_aux_loss_coeff``: as in
    :func:`transformer_config_from_hf`).

    Call after :func:`megatron_lora.init_distributed` on every rank. The model is in eval
    mode; its vocabulary is padded for TP as :func:`~megatron_lora.model.gpt.build_gpt` pads it.
    """
    hf_config = read_hf_config(hf_dir)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    config, kwargs = transformer_config_from_hf(hf_config, tp, pp, dtype, ps.get_expert_model_parallel_world_size(),
                                                ps.get_expert_tensor_parallel_world_size(), sequence_parallel,
                                                moe_aux_loss_coeff)
    facts = hf_model_facts(hf_config)
    ckpt = SafetensorsCheckpoint(hf_dir)
    # With tied embeddings and PP > 1 the last stage's output weight is moved with .cuda().
    with cuda_on_cpu():
        model = build_gpt(
            config,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            **kwargs,
        )
    mark_split_weights(model)
    load_base_weights(model, ckpt, facts, hf_biases(hf_config), kwargs["share_embeddings_and_output_weights"],
                      MOE_HF_NAMES.get(hf_config["model_type"]))
    model.eval()
    return model, facts


def mark_split_weights(model: torch.nn.Module) -> None:
    """Give the parallel layers' weights (and column biases) the tensor-parallel marks
    megatron-core sets only while initialising them, which ``perform_initialization=False``
    skips; parameter counts read them (:func:`megatron_lora.model.lora.trainable_parameters`)."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims = {"weight": 0, "bias": 0}
        elif isinstance(module, RowParallelLinear):
            dims = {"weight": 1}
        else:
            continue
        for name, dim in dims.items():
            param = module._parameters.get(name)
            if param is not None and not hasattr(param, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(param, True, dim, 1)
