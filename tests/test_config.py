"""LoraConfig and layout rules: PEFT's matching, scalings, and clear errors (no ranks needed)."""

from __future__ import annotations

import math

import pytest
from torch import nn

from megatron_lora import LoraConfig
from megatron_lora.hf.layout import ModelFacts, fuse_qkv, split_qkv
from megatron_lora.parallel.lora_layers import add_lora_support, shard_rows, unshard_rows

FACTS = ModelFacts(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                   head_dim=8, ffn_hidden_size=96, gated_linear_unit=True, vocab_size=128)


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        (dict(target_modules=["q_proj", 3]), "target_modules", "3"),
        (dict(layers_pattern=["layers", 2]), "layers_pattern", "2"),
        (dict(r=0), "r", "0"),
        (dict(r=-2), "r", "-2"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern", "0"),
        (dict(use_dora="yes"), "use_dora", "'yes'"),
        (dict(bias="lora_only"), "bias", "'lora_only'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save", "['lm_head']"),
        (dict(init_lora_weights="pissa"), "init_lora_weights", "'pissa'"),
        (dict(lora_dropout=1.0), "lora_dropout", "1.0"),
    ],
)
def test_bad_config_names_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError, match=field) as e:
        LoraConfig(**kwargs)
    assert value in str(e.value)


def test_unknown_peft_field_refused_bookkeeping_ignored():
    cfg = LoraConfig.from_dict({"r": 4, "target_modules": ["q_proj"], "peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_bias": False})
    assert cfg.r == 4
    with pytest.raises(ValueError, match="lora_bias=True"):
        LoraConfig.from_dict({"r": 4, "lora_bias": True})


def test_matching_follows_peft():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 3], exclude_modules=["model.layers.3.self_attn.v_proj"])
    assert cfg.matches("model.layers.1.self_attn.q_proj", 1)
    assert not cfg.matches("model.layers.0.self_attn.q_proj", 0)
    assert cfg.matches("model.layers.3.self_attn.q_proj", 3)
    assert not cfg.matches("model.layers.3.self_attn.v_proj", 3)
    regex = LoraConfig(target_modules=r".*\.(k|o)_proj", layers_to_transform=[0])
    assert regex.matches("model.layers.2.self_attn.k_proj", 2)  # layers_to_transform: list targets only
    assert not regex.matches("model.layers.2.self_attn.q_proj", 2)
    assert LoraConfig(target_modules="all-linear").target_list() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert LoraConfig().target_modules == ["q_proj", "v_proj"]
    # Any module name; without a known layer index, layers_to_transform reads PEFT's from the name.
    mla = LoraConfig(target_modules=["linear_q_down_proj"], layers_to_transform=[2])
    assert mla.matches("decoder.layers.2.self_attention.linear_q_down_proj")
    assert not mla.matches("decoder.layers.1.self_attention.linear_q_down_proj")
    assert not mla.matches("layers.2.linear_q_down_proj")  # PEFT's default pattern needs a component before
    assert LoraConfig(target_modules=["linear_fc1"], layers_to_transform=[2], layers_pattern="blocks").matches("blocks.2.linear_fc1")
    assert mla.layer_index("vision.blocks.3.layers.1.x") == 3  # the first numbered component, as in PEFT
    every = LoraConfig(target_modules="all-linear", exclude_modules=["linear_kv_up_proj"])
    assert every.matches("tower.linear_fc1", any_linear=True) and not every.matches("output_layer", any_linear=True)
    assert not every.matches("a.linear_kv_up_proj", any_linear=True)
    assert not every.matches("decoder.layers.0.mlp.linear_fc1")  # the known layout: HF projections only


def test_rank_alpha_patterns_and_rslora():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3})
    assert cfg.rank_alpha("model.layers.0.self_attn.v_proj") == (4, 3)
    assert cfg.rank_alpha("model.layers.1.self_attn.q_proj") == (2, 16)
    assert cfg.rank_alpha("model.layers.0.self_attn.q_proj") == (8, 16)
    assert cfg.scaling("model.layers.0.self_attn.q_proj") == 2.0
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling("x.q_proj") == 8 / math.sqrt(16)


@pytest.mark.parametrize("tp, field", [(3, "num_attention_heads"), (4, "num_query_groups")])
def test_tp_divisibility(tp, field):
    with pytest.raises(ValueError, match=field):
        FACTS.segment_geometry("linear_qkv", "q_proj", tp)


def test_qkv_interleave_and_gated_shards_round_trip():
    import torch

    q, k, v = torch.randn(64, 3), torch.randn(16, 3), torch.randn(16, 3)
    fused = fuse_qkv(q, k, v, groups=2)
    # group 0: 4 q heads (32 rows), k (8), v (8)
    assert torch.equal(fused[:32], q[:32]) and torch.equal(fused[32:40], k[:8]) and torch.equal(fused[40:48], v[:8])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, FACTS), (q, k, v)))
    gate_up = torch.arange(8.0).reshape(8, 1)  # [gate 0..3; up 4..7]
    shards = [shard_rows(gate_up, 2, j, 2) for j in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 4, 5]
    assert torch.equal(unshard_rows(shards, 2), gate_up)


def test_unwrappable_class_is_named():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match="MyLinear"):
        add_lora_support(MyLinear(2, 2))
