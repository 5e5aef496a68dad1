"""Normalisation layers for megatron-core's local spec that allow sequence parallelism.

megatron-core's local spec builds its norms with ``WrappedTorchNorm``, which refuses
``sequence_parallel`` (apex and Transformer Engine provide the norms that allow it). A norm
works token by token, so under sequence parallelism it runs unchanged on this rank's
``[tokens / TP]`` shard of the hidden states; only the gradient of its replicated weight (and
bias) becomes a partial sum over the TP group's token shards. :class:`TorchNorm` is
``WrappedTorchNorm``'s torch module with those parameters marked ``sequence_parallel``:
megatron-core's ``finalize_model_grads`` sums the gradients of parameters so marked over TP
when the config has ``sequence_parallel`` (LoRA training freezes the norms, but the mark keeps
a trainable norm right). :func:`with_torch_norms` rewrites a spec to use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

_NORMS = {"LayerNorm": nn.LayerNorm, "RMSNorm": nn.RMSNorm}


class TorchNorm:
    """``WrappedTorchNorm`` (same constructor) that allows ``config.sequence_parallel``.

    Builds ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` as ``config.normalization`` says.
    The query / key norms of ``qk_layernorm`` are built by this class too; megatron-core sums
    their gradients over TP by name whatever the mark says (each rank normalises its own heads).
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> nn.Module:
        for field in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, field):
                raise ValueError(f"{field}=True needs apex or Transformer Engine norms")
        if config.normalization not in _NORMS:
            raise ValueError(f"normalization={config.normalization!r} is not one of {sorted(_NORMS)}")
        norm = _NORMS[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_torch_norms(spec: Any) -> Any:
    """A copy of a layer or block spec (or any spec dataclass) with every ``WrappedTorchNorm``
    replaced by :class:`TorchNorm`; the given spec is left unchanged."""
    if spec is WrappedTorchNorm:
        return TorchNorm
    if isinstance(spec, (list, tuple)):
        return type(spec)(with_torch_norms(s) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: with_torch_norms(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.init}
        return dataclasses.replace(spec, **changes)
    return spec
