"""Correct gradients of megatron-core's multi-latent attention under tensor parallelism.

With a column-parallel ``linear_kv_down_proj`` (the local spec), ``MLASelfAttention``
all-gathers the projection's output, splits it into the compressed KV latent and the RoPE
key ``k_pos_emb``, and expands ``k_pos_emb`` over this rank's heads only. The gather's
backward keeps this rank's slice of the gradient, which is right for the latent (its
gradient comes through ``linear_kv_up_proj``, whose backward already sums over TP) but not
for ``k_pos_emb``: each rank holds only its own heads' share, and the slice drops the other
ranks' shares (NVIDIA/Megatron-LM#1699, open in megatron-core 0.16.1). The gradients of
``linear_kv_down_proj`` and of everything before it are then wrong at TP > 1, with or without
sequence parallelism; the forward is right.

:func:`reduce_mla_rope_key_grads` fixes it: that gather's backward sums the ``k_pos_emb``
columns of the gradient over TP (one all-reduce of [tokens, qk_pos_emb_head_dim]) before
taking the slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer import multi_latent_attention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from torch import nn

# The tag a hooked linear_kv_down_proj puts on its output: how many trailing columns (of the
# gathered output) are the RoPE key; and the mark of a hooked module.
_ROPE_COLUMNS = "_megatron_lora_rope_key_columns"
_HOOKED = "_megatron_lora_rope_key_hooked"
_megatron_gather = mappings.gather_from_tensor_model_parallel_region


class _GatherSummingRopeKey(torch.autograd.Function):
    """All-gather along the last dim; backward: sum the trailing ``columns`` of the gradient
    over ``group``, then keep this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, columns: int) -> torch.Tensor:
        ctx.group, ctx.columns = group, columns
        return mappings._gather_along_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rope = grad[..., -ctx.columns:].contiguous()
        dist.all_reduce(rope, group=ctx.group)
        grad = torch.cat([grad[..., : -ctx.columns], rope], dim=-1)
        return mappings._split_along_last_dim(grad, ctx.group), None, None


def _gather(input_: torch.Tensor, group=None) -> torch.Tensor:
    columns = getattr(input_, _ROPE_COLUMNS, None)
    if columns is None:
        return _megatron_gather(input_, group)
    group = mappings.get_tensor_model_parallel_group_if_none(group)
    return _GatherSummingRopeKey.apply(input_, group, columns)


def _tag_output(columns: int):
    def hook(module: nn.Module, args, output):
        setattr(output[0], _ROPE_COLUMNS, columns)

    return hook


def reduce_mla_rope_key_grads(model: nn.Module) -> int:
    """Make every ``MLASelfAttention`` of ``model`` with a column-parallel
    ``linear_kv_down_proj`` sum its RoPE key's gradient over TP; return how many.

    Idempotent per layer. Only the gather of a hooked ``linear_kv_down_proj`` changes; every
    other use of megatron-core's ``gather_from_tensor_model_parallel_region`` is untouched.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, MLASelfAttention) or not isinstance(module.linear_kv_down_proj, ColumnParallelLinear):
            continue
        if not getattr(module.linear_kv_down_proj, _HOOKED, False):
            module.linear_kv_down_proj.register_forward_hook(_tag_output(module.config.qk_pos_emb_head_dim))
            setattr(module.linear_kv_down_proj, _HOOKED, True)
        count += 1
    if count:
        # MLASelfAttention calls the gather through its module's name for it.
        multi_latent_attention.gather_from_tensor_model_parallel_region = _gather
    return count
