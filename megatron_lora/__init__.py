"""megatron-lora: exact tensor-parallel LoRA and X-LoRA for megatron-core models."""

from megatron_lora.model.adapters import adapter_state_dict, load_adapter, save_adapter
from megatron_lora.config import LoraConfig
from megatron_lora.runtime.distributed import init_distributed
from megatron_lora.model.lora import (
    allreduce_tied_adapter_grads,
    apply_lora,
    enable_adapters,
    freeze_base,
    lora_layer_spec,
    merge_lora,
    set_adapters,
    trainable_parameters,
    trainable_parameters_report,
    unmerge_lora,
)
from megatron_lora.model.xlora import XLoraConfig, XLoraModel, apply_xlora
from megatron_lora.parallel.lora_layers import LoraComputeDtype, configure_lora_layers

__all__ = [
    "LoraConfig",
    "init_distributed",
    "apply_lora",
    "allreduce_tied_adapter_grads",
    "merge_lora",
    "unmerge_lora",
    "set_adapters",
    "enable_adapters",
    "freeze_base",
    "lora_layer_spec",
    "trainable_parameters",
    "trainable_parameters_report",
    "adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "XLoraConfig",
    "XLoraModel",
    "apply_xlora",
    "LoraComputeDtype",
    "configure_lora_layers",
]
