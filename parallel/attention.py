"""Core attention for megatron-core's local spec on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the [batch, heads, sq, sk] scores;
SDPA dispatches to flash / memory-efficient kernels on GPU and to a fused math path on CPU.
:class:`SDPAttention` takes the same constructor and forward arguments (plus the
``k_channels`` / ``v_channels`` of multi-latent attention) and returns the same
[sq, b, heads * v_channels] context, so it drops into any layer spec;
:func:`with_sdpa_attention` rewrites a spec to use it.

Masks follow megatron-core's convention: an explicit ``attention_mask`` is boolean,
broadcastable to [b, heads, sq, sk], True = masked, and replaces the causal mask (a packed
batch passes its block-diagonal causal mask). Without one, a causal layer is causal with the
diagonal aligned bottom-right: queries are the LAST ``sq`` of ``sk`` positions, as in
KV-cache decoding and chunked prefill (SDPA's ``is_causal`` aligns top-left when sq != sk).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch.nn.attention.bias import causal_lower_right

_CAUSAL = (AttnMaskType.causal, AttnMaskType.causal_bottom_right, AttnMaskType.padding_causal)


class SDPAttention(MegatronModule):
    """Drop-in core attention (``DotProductAttention``'s signature) on SDPA.

    Query [sq, b, heads, k_channels], key [sk, b, groups, k_channels] and value
    [sk, b, groups, v_channels] (this rank's heads) give [sq, b, heads * v_channels].
    Grouped-query attention, the softmax scale, dropout drawn under megatron-core's
    model-parallel RNG tracker (as ``DotProductAttention`` draws it), and different key and
    value head sizes are supported; sliding windows, context parallelism, softmax offsets,
    attention biases and ``packed_seq_params`` are refused.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context_parallel_size must be 1")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type={config.softmax_type!r} is not supported (only 'vanilla')")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"SDPAttention: window_size={config.window_size} (sliding windows) is not supported")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        world = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.num_heads = divide(config.num_attention_heads, world)
        self.num_groups = divide(config.num_query_groups, world)
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        # apply_query_key_layer_scaling only rescales fp16 scores for range: the product of
        # DotProductAttention's two factors is this scale.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            raise ValueError("SDPAttention: packed_seq_params is not supported; pass the packed batch's "
                             "block-diagonal causal attention_mask instead")
        sq, b = query.shape[:2]
        sk = key.shape[0]
        # megatron-core's static inference passes no_mask once a KV cache holds the prompt,
        # assuming one new token; the layer's own causal type keeps multi-token chunks causal.
        causal = self.attn_mask_type in _CAUSAL or attn_mask_type in _CAUSAL
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # SDPA: True = takes part
        elif causal and sq > 1:
            if sq > sk:
                raise ValueError(f"SDPAttention: causal attention with {sq} queries over {sk} keys")
            if sq == sk:
                is_causal = True
            else:
                mask = causal_lower_right(sq, sk)
        # GQA without copies where the kernels take it (no mask object); repeated heads else.
        gqa = self.num_heads != self.num_groups
        if gqa and mask is not None:
            k, v = (t.repeat_interleave(self.num_heads // self.num_groups, dim=1) for t in (k, v))
            gqa = False
        dropout = self.dropout_p if self.training else 0.0

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=gqa,
            )

        if dropout > 0.0 and not self.config.sequence_parallel:
            # Heads are split over TP: each rank draws its own mask from the model-parallel stream.
            with get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, n, sq, dv] -> [sq, b, n * dv]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.v_channels)


def with_sdpa_attention(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a transformer-layer (or transformer-block) spec whose self-attention's
    ``core_attention`` is :class:`SDPAttention`; the given spec is left unchanged."""
    subs = spec.submodules
    if hasattr(subs, "layer_specs"):  # a block spec: every layer
        layers = [with_sdpa_attention(layer) for layer in subs.layer_specs]
        return dataclasses.replace(spec, submodules=dataclasses.replace(subs, layer_specs=layers))
    attention = getattr(subs, "self_attention", None)
    if not isinstance(attention, ModuleSpec) or not hasattr(attention.submodules, "core_attention"):
        raise ValueError(f"with_sdpa_attention: {spec.module!r} spec has no self_attention.core_attention")
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(subs, self_attention=attention))
