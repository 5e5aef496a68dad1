"""Build megatron-core GPT models (local spec) that run on CPU or GPU."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_lora.hf.layout import padded_vocab_size
from megatron_lora.parallel.attention import with_sdpa_attention
from megatron_lora.parallel.device import device
from megatron_lora.parallel.mla import reduce_mla_rope_key_grads
from megatron_lora.parallel.norms import with_torch_norms


#: Model dtypes by their command-line names.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def gpt_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int,
    num_query_groups: Optional[int] = None,
    kv_channels: Optional[int] = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    fusions: Optional[bool] = None,
    **overrides,
) -> TransformerConfig:
    """A LLaMA-style TransformerConfig (RMSNorm, SwiGLU, no linear bias, no dropout).

    With CUDA, parameters are created on the current device (megatron-core initialises each
    rank's shard there from its model-parallel RNG stream); without it, megatron-core
    initialises the full weights on the CPU and splits them, so a seed gives the same model
    at every TP size. ``fusions`` (default: with CUDA) turns on megatron-core's fusions that
    need neither Transformer Engine nor apex: SwiGLU (one function that keeps only its
    input for backward) and bias-dropout-add. Both are ``torch.compile`` regions, which cost
    about a minute of compilation per shape on a CPU; the rest need TE or apex and stay off.

    ``multi_latent_attention=True`` (with the MLA fields: ``q_lora_rank``, ``kv_lora_rank``,
    ``qk_head_dim``, ``qk_pos_emb_head_dim``, ``v_head_dim``, ``rope_type``, ...) gives an
    ``MLATransformerConfig``; its RoPE comes from the config (``rotary_base``, YaRN fields).
    """
    cuda = torch.cuda.is_available()
    fusions = cuda if fusions is None else fusions
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups or num_attention_heads,
        kv_channels=kv_channels,
        ffn_hidden_size=ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # megatron-core requires it whenever PP > 1
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not cuda,
        bias_activation_fusion=fusions,
        bias_dropout_fusion=fusions,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(overrides)
    cls = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
    return cls(**kwargs)


def build_gpt(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int = 4096,
    rotary_base: float = 10000.0,
    share_embeddings_and_output_weights: bool = False,
    layer_spec=None,
    **kwargs,
) -> GPTModel:
    """A GPTModel with RoPE on the current device: megatron-core's local (no Transformer
    Engine) spec with SDPA core attention and norms that allow sequence parallelism
    (:class:`~megatron_lora.parallel.norms.TorchNorm`), or ``layer_spec`` as given.

    The vocabulary is padded to a multiple of the TP size (VocabParallelEmbedding splits it
    evenly); ``model.unpadded_vocab_size`` keeps ``vocab_size``, and the padding never reaches
    logits, losses or sampling (:func:`real_vocab_size`).

    With ``config.multi_latent_attention`` (an ``MLATransformerConfig``) the layers use
    megatron-core's ``MLASelfAttention`` (SDPA core attention takes MLA's separate key and
    value head sizes), whose RoPE comes from the config, not ``rotary_base``, and whose RoPE
    key gradient is summed over TP (:func:`~megatron_lora.parallel.mla.reduce_mla_rope_key_grads`).

    With ``config.num_moe_experts`` the MoE layers (``config.moe_layer_freq``) use the local
    spec's ``SequentialMLP`` experts; see :func:`check_moe_config` for what is refused.
    """
    if layer_spec is not None:
        spec = layer_spec
    else:
        if config.num_moe_experts:
            check_moe_config(config)
            block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)
        else:
            # A block spec, not a layer spec: a layer spec gets megatron-core's default final norm.
            layer = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm,
                                             multi_latent_attention=config.multi_latent_attention)
            block = TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                               layer_norm=WrappedTorchNorm)
        block = dataclasses.replace(block, layer_specs=[with_sdpa_attention(s) for s in block.layer_specs])
        spec = with_torch_norms(block)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=max_sequence_length,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        **kwargs,
    )
    # megatron-core allocates its own layers on the device; torch norms (TorchNorm,
    # WrappedTorchNorm) come without a device or dtype. Give them the parameters' dtype
    # too: a bf16 input with an fp32 norm weight misses torch's fused RMSNorm kernel.
    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(device=device(), dtype=config.params_dtype)
    # megatron-core's MLA drops part of its RoPE key's gradient at TP > 1 (see parallel/mla.py).
    reduce_mla_rope_key_grads(model)
    model.unpadded_vocab_size = vocab_size
    return model


def check_moe_config(config: TransformerConfig) -> None:
    """Refuse, by name, the MoE settings the local spec cannot run here.

    Grouped-GEMM experts need the ``grouped_gemm`` package or Transformer Engine; shared
    experts (Qwen2-MoE) are out of scope; without CUDA only the ``allgather`` token
    dispatcher runs (``alltoall`` creates a ``torch.cuda.Stream`` when it is built).
    """
    if config.moe_grouped_gemm:
        raise ValueError("moe_grouped_gemm=True is not supported (grouped-GEMM experts need "
                         "grouped_gemm or Transformer Engine): use SequentialMLP experts")
    if config.moe_shared_expert_intermediate_size:
        raise ValueError("moe_shared_expert_intermediate_size is set: shared experts are not supported")
    if not torch.cuda.is_available() and config.moe_token_dispatcher_type != "allgather":
        raise ValueError(f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r} cannot run "
                         "without CUDA; use 'allgather'")


def real_vocab_size(model: torch.nn.Module) -> Optional[int]:
    """The vocabulary without the TP padding :func:`build_gpt` adds (a GPTModel built elsewhere
    has none); None for a module tree without a vocabulary."""
    if hasattr(model, "unpadded_vocab_size"):
        return model.unpadded_vocab_size
    return model.vocab_size if isinstance(model, GPTModel) else None


def positions_for(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
