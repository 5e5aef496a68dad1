"""Single-device oracle: the same network as a Megatron GPTModel, as HF Llama + PEFT.

Runs inside a spawned rank: gathers the TP-sharded Megatron weights into full tensors,
maps them to HF names, and builds ``LlamaForCausalLM`` + PEFT LoRA with the same values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_lora.hf.layout import ModelFacts, hf_module_name, megatron_full_to_hf
from megatron_lora.model.lora import iter_linear_modules
from megatron_lora.parallel.lora_layers import LoraLayer, unshard_rows

TOL = 1e-5  # max |diff| <= TOL * max |logit| (fp32)


def gather_rows(t: torch.Tensor, dim: int, blocks: int = 1) -> torch.Tensor:
    world = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    if dim == 0:
        return unshard_rows(parts, blocks)
    return torch.cat(parts, dim)


def full_param(name: str, p: torch.Tensor, gated: bool) -> torch.Tensor:
    if not getattr(p, "tensor_model_parallel", False):
        return p.detach().clone()
    blocks = 2 if gated and name.endswith("mlp.linear_fc1.weight") else 1
    return gather_rows(p.detach(), p.partition_dim, blocks)


def full_base_state(model) -> dict[str, torch.Tensor]:
    """TP=1 Megatron state dict (base weights only) gathered from every TP rank."""
    gated = model.config.gated_linear_unit
    return {
        n: full_param(n, p, gated)
        for n, p in model.named_parameters()
        if not any(f".{f}." in n for f in ("lora_A", "lora_B", "lora_magnitude_vector"))
    }


def hf_llama(model, facts: ModelFacts):
    """LlamaForCausalLM holding the gathered base weights of ``model``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    hf_cfg = LlamaConfig(
        vocab_size=facts.vocab_size,
        hidden_size=facts.hidden_size,
        intermediate_size=facts.ffn_hidden_size,
        num_hidden_layers=facts.num_layers,
        num_attention_heads=facts.num_attention_heads,
        num_key_value_heads=facts.num_query_groups,
        head_dim=facts.head_dim,
        rms_norm_eps=cfg.layernorm_epsilon,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    # A tied lm_head is the embedding's weight: the state dict has no lm_head.weight.
    missing, unexpected = hf.load_state_dict(megatron_full_to_hf(full_base_state(model), facts), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tied else []), (missing, unexpected)
    return hf


def _full_factors(model, adapter: str, value) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module name -> full (value(A), value(B)) of every per-projection segment."""
    out = {}
    for _, layer, kind, module in iter_linear_modules(model):
        if not isinstance(module, LoraLayer) or adapter not in module.lora_specs:
            continue
        for seg in module.lora_specs[adapter].segments:
            a = value(module.lora_A[adapter][seg.name])
            b = value(module.lora_B[adapter][seg.name])
            if module.parallel_mode == "column":
                b = gather_rows(b, 0)
            else:
                a = gather_rows(a, 1)
            out[hf_module_name(layer, seg.name)] = (a, b)
    return out


def peft_lora_tensors(model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module name -> full (A, B) of every per-projection segment of ``adapter``."""
    return _full_factors(model, adapter, lambda p: p.detach())


def lora_grads(model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Like :func:`peft_lora_tensors` but for the gradients."""
    return _full_factors(model, adapter, lambda p: p.grad)


def peft_model(hf, tensors: dict, r: int, alpha: float, targets: list[str]):
    """PEFT LoRA on ``hf`` with the given full factors (keys: HF module names)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pm = get_peft_model(hf, PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    modules = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b) in tensors.items():
            pa, pb = peft_factors(modules[name])
            pa.copy_(a)
            pb.copy_(b)
    return pm.eval()


def peft_factors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A, B) parameters of adapter "default" on a LoRA module (linear or embedding)."""
    if "default" in getattr(module, "lora_embedding_A", {}):
        return module.lora_embedding_A["default"], module.lora_embedding_B["default"]
    return module.lora_A["default"].weight, module.lora_B["default"].weight


def save_random_peft_lora(base, path, seed: int, b_scale: float, **lora_config):
    """A PEFT LoRA with random A and B (B times ``b_scale``: moderate deltas keep fp32 comparisons
    well conditioned) on a copy of the HF ``base``, saved to ``path``; returns the PEFT model."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(b_scale)
    pm.save_pretrained(path)
    return pm
