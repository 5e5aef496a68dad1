"""X-LoRA on megatron-core models: a mixture of frozen LoRA experts, per token and layer.

``apply_xlora(model, config, adapters)`` loads the experts as adapters "0".."n-1" on the
model's LoRA layers and returns an :class:`XLoraModel` that wraps it. Its forward is
PEFT's XLoraModel's:

1. scaling pass, under no_grad: every LoRA layer mixes its experts with scalings filled
   with ``scaling_pass_value``; the hidden state entering the output layer (after the
   final norm) is captured;
2. the sharded classifier turns it into scalings [batch, seq, n_layers, n_experts],
   replicated on every TP rank (its own collectives are the only ones X-LoRA adds);
3. scaled pass: every LoRA layer mixes its experts with its layer's scalings, after
   ``top_k_lora`` and ``enable_softmax_topk``, times ``global_scaling_weight``.

With pipeline parallelism (inference only) both passes run through the stages, and the
scalings the last stage computes are broadcast to every stage before the scaled pass.

X-LoRA "layers" are the LoRA-adapted HF projections in HF order (per block q, k, v, o,
gate, up, down; those targeted by any expert), so each segment of a fused Megatron layer
has its own index.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from megatron_lora.config import LoraConfig, XLoraConfig
from megatron_lora.hf.layout import HF_PROJECTIONS, ModelFacts, segment_projection
from megatron_lora.model.lora import enable_adapters, iter_linear_modules
from megatron_lora.formats.checkpoint import checkpoint_config, write_config, write_shard
from megatron_lora.formats.outputs import shared_atomic_directory
from megatron_lora.formats.peft import open_adapter
from megatron_lora.formats.xlora import check_bundle, check_expert_config, megatron_key, read_xlora
from megatron_lora.model.adapters import load_adapter, model_facts, save_adapter
from megatron_lora.parallel import collectives
from megatron_lora.parallel.lora_layers import LoraLayer
from megatron_lora.parallel.xlora_classifier import ShardedXLoraClassifier
from megatron_lora.parallel.xlora_mixing import XLoraMixing


class _ScalingsSource:
    """What every X-LoRA layer reads: the current scalings and the per-layer rules.

    A plain object (not a module) so the layers can hold it without nesting modules.
    """

    def __init__(self, config: XLoraConfig, experts: list[str]):
        self.config = config
        self.experts = experts
        self.scalings: Optional[torch.Tensor] = None  # [batch, seq, n_layers, n_experts]
        self.all_zero = False

    def for_layer(self, index: int) -> Optional[torch.Tensor]:
        """Scalings of X-LoRA layer ``index`` for the layer's tokens, [seq * batch, n].

        None when every scaling is zero (a scaling pass with scaling_pass_value 0: top-k and
        softmax-top-k keep zeros zero), so the layers skip the experts' GEMMs.
        """
        if self.scalings is None:
            raise RuntimeError("X-LoRA layer called outside XLoraModel.forward (no scalings set)")
        if self.all_zero:
            return None
        s = self.scalings[:, :, index, :]
        k = self.config.top_k_lora
        if k is not None:
            top = torch.topk(s, k=k, dim=-1).indices
            s = s * torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True).to(s.dtype)
        if self.config.enable_softmax_topk:
            keep = s != 0
            s = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
        # Megatron's activations are [seq, batch, ...].
        return (s * self.config.global_scaling_weight).transpose(0, 1).reshape(-1, s.shape[-1])


class XLoraModel(nn.Module):
    """A GPTModel with X-LoRA experts and a sharded classifier (PEFT's XLoraModel API)."""

    def __init__(self, model: nn.Module, config: XLoraConfig, experts: list[str],
                 layer_indices: dict[LoraLayer, dict[str, int]], n_layers: int, expert_configs: list[LoraConfig]):
        """``layer_indices``: per LoRA layer, segment name -> X-LoRA layer index (see
        :func:`assign_layer_indices`); the experts become mixing terms of those layers."""
        super().__init__()
        self.model = model
        self.config = config
        self.experts = experts
        #: Each expert's LoraConfig (its scalings; what a save writes).
        self.expert_configs = expert_configs
        self.n_layers = n_layers
        tp_group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
        dtype = next(model.parameters()).dtype
        self.xlora_classifier = ShardedXLoraClassifier(
            hidden_size=config.hidden_size,
            n_classes=len(experts),
            n_layers=n_layers,
            depth=config.xlora_depth,
            size=config.xlora_size,
            dropout_p=config.xlora_dropout_p,
            layerwise_scalings=config.layerwise_scalings,
            enable_softmax=config.enable_softmax,
            softmax_temperature=config.softmax_temperature,
            tp_group=tp_group,
            dtype=dtype,
        )
        self._source = _ScalingsSource(config, experts)
        for layer, index in layer_indices.items():
            # The experts are mixed by the term, never added as plain LoRA.
            layer.set_active_adapters([a for a in layer.active_adapters if a not in experts])
            layer.extra_terms.append(XLoraMixing(layer, self._source, experts, index))
        self.disabled = False
        self.scalings_logging = False
        self._log: list[torch.Tensor] = []
        self._latest: Optional[torch.Tensor] = None

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                scaling_inference_context=None, fixed_scalings: Optional[torch.Tensor] = None, **kwargs):
        """Scaling pass, classifier, scaled pass; ``kwargs`` go to the GPTModel.

        KV-cache decoding gives each pass its own cache: ``inference_context`` (in kwargs)
        for the scaled pass, ``scaling_inference_context`` for the scaling pass (it must
        materialize every position: ``materialize_only_last_token_logits = False``).
        ``fixed_scalings`` [batch, seq, n_layers, n_experts] skips the scaling pass and the
        classifier and mixes the experts with these scalings instead.
        """
        if self.disabled:
            return self.model(input_ids, position_ids, attention_mask, **kwargs)
        if fixed_scalings is not None:
            self._record(fixed_scalings)
            return self.model(input_ids, position_ids, attention_mask, **kwargs)
        if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            if kwargs or scaling_inference_context is not None:
                raise ValueError(f"X-LoRA under pipeline parallelism takes no extra arguments, got {sorted(kwargs)}")
            return self._pipeline_forward(input_ids, position_ids, attention_mask)
        if kwargs.get("inference_context") is not None and scaling_inference_context is None:
            # One cache shared by both passes would mix their keys and values.
            raise ValueError("X-LoRA with an inference_context needs its own scaling_inference_context")
        scaling_kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        if scaling_inference_context is not None:
            scaling_kwargs["inference_context"] = scaling_inference_context
        hidden = self._scaling_pass(input_ids, position_ids, attention_mask, **scaling_kwargs)
        self._record(self.xlora_classifier(hidden.transpose(0, 1)))
        return self.model(input_ids, position_ids, attention_mask, **kwargs)

    def _record(self, scalings: torch.Tensor) -> None:
        """Make ``scalings`` the layers' scalings, the latest ones, and log them if asked."""
        if self.scalings_logging:
            self._log.append(scalings.detach())
        self._latest = scalings
        self._source.scalings = scalings

    def _set_constant_scalings(self, b: int, s: int) -> None:
        value = self.config.scaling_pass_value
        value = 1.0 / len(self.experts) if value is None else value
        p = next(self.xlora_classifier.parameters())
        self._source.scalings = torch.full((b, s, self.n_layers, len(self.experts)), value, dtype=p.dtype, device=p.device)
        self._source.all_zero = value == 0

    def _scaling_pass(self, input_ids, position_ids, attention_mask, **kwargs) -> torch.Tensor:
        """Run the model with constant scalings; return the output layer's input [s, b, h]."""
        self._set_constant_scalings(*input_ids.shape)
        captured = []
        handle = self.model.output_layer.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                self.model(input_ids, position_ids, attention_mask, **kwargs)
        finally:
            handle.remove()
            self._source.all_zero = False
        return captured[0]

    @torch.no_grad()
    def _pipeline_forward(self, input_ids, position_ids, attention_mask) -> torch.Tensor:
        """Both passes through the pipeline stages (inference): the last stage's classifier
        output is broadcast to every stage before the scaled pass. Returns the logits on the
        last stage and this stage's output activations elsewhere."""
        if self.training:
            raise ValueError("X-LoRA training with pipeline_model_parallel_size > 1 is not supported (eval only)")
        b, s = input_ids.shape
        last = ps.is_pipeline_last_stage()
        self._set_constant_scalings(b, s)
        captured = []
        handle = self.model.output_layer.register_forward_pre_hook(lambda _, a: captured.append(a[0])) if last else None
        try:
            self._through_stages(input_ids, position_ids, attention_mask)
        finally:
            self._source.all_zero = False
            if handle is not None:
                handle.remove()
        p = next(self.xlora_classifier.parameters())
        scalings = torch.empty(b, s, self.n_layers, len(self.experts), dtype=p.dtype, device=p.device)
        if last:
            scalings = self.xlora_classifier(captured[0].transpose(0, 1))
        scalings = collectives.broadcast_from_last_stage(
            scalings, ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
        )
        self._record(scalings)
        return self._through_stages(input_ids, position_ids, attention_mask)

    def _through_stages(self, input_ids, position_ids, attention_mask) -> torch.Tensor:
        if not ps.is_pipeline_first_stage():
            b, s = input_ids.shape
            shape = (s, b, self.model.config.hidden_size)
            dtype = next(self.model.parameters()).dtype
            self.model.set_input_tensor(
                collectives.recv_from_previous_stage(shape, dtype, ps.get_pipeline_model_parallel_prev_rank())
            )
        out = self.model(input_ids, position_ids, attention_mask)
        if not ps.is_pipeline_last_stage():
            collectives.send_to_next_stage(out, ps.get_pipeline_model_parallel_next_rank())
        return out

    # -- PEFT's XLoraModel API ----------------------------------------------------------------
    def enable_adapter_layers(self) -> None:
        self.disabled = False
        enable_adapters(self.model, True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone (no scaling pass, no experts)."""
        self.disabled = True
        enable_adapters(self.model, False)

    def set_topk_lora(self, value: Optional[int]) -> None:
        if value is not None and value < 1:
            raise ValueError(f"top_k_lora must be at least 1 or None, got {value}")
        self.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        self.config.global_scaling_weight = weight

    def get_global_scaling_weight(self) -> float:
        return self.config.global_scaling_weight

    def set_scaling_pass_value(self, value: Optional[float]) -> None:
        """None means 1 / n_experts (stored in the config as that number, as PEFT does)."""
        self.config.scaling_pass_value = 1.0 / len(self.experts) if value is None else value

    def get_latest_scalings(self) -> Optional[torch.Tensor]:
        """The last forward's scalings [batch, seq, n_layers, n_experts] (None before one)."""
        return self._latest

    def enable_scalings_logging(self) -> None:
        self.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging, keeping the log."""
        self.scalings_logging = False

    def clear_scalings_log(self) -> None:
        self._log.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the log's list: scalings [batch, seq, n_layers, n_experts] per forward."""
        return list(self._log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log bucketed by sequence length: {seq_len: (positions in log, scalings)}."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, s in enumerate(self._log):
            positions, tensors = buckets.setdefault(s.shape[1], ([], []))
            positions.append(i)
            tensors.append(s)
        return buckets


def base_gpt(model: nn.Module) -> nn.Module:
    """The GPTModel inside an :class:`XLoraModel` (any other model: itself)."""
    return model.model if isinstance(model, XLoraModel) else model


def assign_layer_indices(model: nn.Module, experts: list[str]) -> tuple[dict[LoraLayer, dict[str, int]], int]:
    """Every adapted segment's X-LoRA layer index, per LoRA layer; and n_layers.

    The index counts adapted HF projections in HF order over GLOBAL layers; under pipeline
    parallelism the stages exchange which (layer, projection) pairs they adapt.
    """
    facts = ModelFacts.from_transformer_config(model.config, vocab_size=0)
    found: dict[tuple[int, str], list[tuple[LoraLayer, str]]] = {}
    for _, layer, kind, module in iter_linear_modules(model):
        if not isinstance(module, LoraLayer):
            continue
        for name in experts:
            for seg in module.lora_specs[name].segments if name in module.lora_specs else ():
                proj = segment_projection(kind, seg.name, facts)
                found.setdefault((layer, proj), []).append((module, seg.name))
    adapted = set(found)
    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, sorted(adapted), group=ps.get_pipeline_model_parallel_group())
        adapted = {tuple(p) for part in parts for p in part}
    order = sorted(adapted, key=lambda lp: (lp[0], HF_PROJECTIONS.index(lp[1])))
    index = {lp: i for i, lp in enumerate(order)}
    per_layer: dict[LoraLayer, dict[str, int]] = {}
    for lp, users in found.items():
        for module, seg_name in users:
            per_layer.setdefault(module, {})[seg_name] = index[lp]
    return per_layer, len(order)


def apply_xlora(
    model: nn.Module,
    config: XLoraConfig,
    adapters: Optional[dict[str, str | Path]] = None,
) -> XLoraModel:
    """Load the experts onto ``model`` and wrap it in an :class:`XLoraModel`.

    ``adapters`` ({name: directory}, default ``config.adapters``) lists the experts in
    order; expert i becomes adapter ``str(i)`` on the layers. The base model is frozen,
    the classifier trainable, the experts trainable only with ``use_trainable_adapters``.
    ``config`` is copied, never changed.
    """
    config = copy.deepcopy(config)
    adapters = dict(config.adapters if adapters is None else adapters)
    if not adapters:
        raise ValueError("X-LoRA needs at least one expert: adapters is empty")
    if config.top_k_lora is not None and config.top_k_lora > len(adapters):
        raise ValueError(f"top_k_lora={config.top_k_lora} exceeds the {len(adapters)} experts")
    if config.adapters and list(config.adapters) != list(adapters):
        raise ValueError(
            f"adapters {list(adapters)} disagree with the config's experts {list(config.adapters)}"
        )
    hidden = model.config.hidden_size
    if config.hidden_size is None:
        config.hidden_size = hidden
    elif config.hidden_size != hidden:
        raise ValueError(f"XLoraConfig.hidden_size={config.hidden_size} but the model's hidden size is {hidden}")
    config.adapters = {k: str(v) for k, v in adapters.items()}
    for d in adapters.values():
        check_expert_config(d, *open_adapter(d))
    experts = [str(i) for i in range(len(adapters))]
    expert_configs = [load_adapter(model, d, name) for name, d in zip(experts, adapters.values())]
    if config.scaling_pass_value is None:
        config.scaling_pass_value = 1.0 / len(experts)
    layer_indices, n_layers = assign_layer_indices(model, experts)
    if n_layers == 0:
        raise ValueError(f"the experts {list(adapters.values())} adapt no module of the model")
    xmodel = XLoraModel(model, config, experts, layer_indices, n_layers, expert_configs)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.use_trainable_adapters:
        for layer in layer_indices:
            for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
                p.requires_grad_(True)
    return xmodel


# -- X-LoRA directories ------------------------------------------------------------------------


def load_xlora(model: nn.Module, directory: str | Path) -> XLoraModel:
    """apply_xlora with the experts and classifier of an X-LoRA directory (any layout)."""
    bundle = read_xlora(directory)
    check_bundle(bundle, model_facts(model))
    xmodel = apply_xlora(model, bundle.config, bundle.experts)
    xmodel.xlora_classifier.load_full_state(bundle.classifier)
    return xmodel


def save_xlora(xmodel: XLoraModel, directory: str | Path, overwrite: bool = False) -> None:
    """Save an XLoraModel as our X-LoRA checkpoint; call on every rank.

    The experts go to ``experts/<i>`` as megatron-lora LoRA checkpoints (``save_adapter``),
    the classifier shards to one file per TP rank (written by the last pipeline stage of
    the first data-parallel replica); the directory appears only when complete.
    """
    with shared_atomic_directory(directory, overwrite) as tmp:
        for i, name in enumerate(xmodel.experts):
            save_adapter(xmodel.model, tmp / "experts" / str(i), xmodel.expert_configs[i], adapter_name=name)
        if ps.get_data_parallel_rank() == 0 and ps.is_pipeline_last_stage():
            shard = {}
            for k, (w, b) in enumerate(xmodel.xlora_classifier.local_state()):
                shard[megatron_key(k, "weight")], shard[megatron_key(k, "bias")] = w, b
            write_shard(tmp, ps.get_tensor_model_parallel_rank(), shard)
        if dist.get_rank() == 0:
            config = xmodel.config.to_dict()
            config["adapters"] = {n: f"experts/{i}" for i, n in enumerate(xmodel.config.adapters)}
            tp = ps.get_tensor_model_parallel_world_size()
            full = checkpoint_config("xlora", tp, model_facts(xmodel.model), config, key="xlora_config")
            write_config(tmp, {**full, "n_layers": xmodel.n_layers})
