"""LoRA on a GPT model's output layer (HF ``lm_head``) and word embedding (HF
``embed_tokens``: PEFT's ``lora_embedding_A`` / ``lora_embedding_B``) at TP=1 and TP=2
against HF + PEFT (logits and LoRA gradients), converters both ways (padded vocabulary
included), and the collective count. An output layer tied to the embedding: ``tests/test_tied_lora.py``.

Tolerance: max |diff| <= 1e-5 x max |logit| (fp32), gradients relative to their own scale.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist import run_ranks
from oracle import TOL

TARGET_SETS = {"lm_head": ["q_proj", "down_proj", "lm_head"], "embed_tokens": ["embed_tokens", "q_proj", "lm_head"]}
IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _build(world):
    from megatron_lora.model.gpt import build_gpt, gpt_config

    torch.manual_seed(7)
    cfg = gpt_config(2, 64, 8, 96, num_query_groups=2, tensor_model_parallel_size=world)
    return build_gpt(cfg, 128, max_sequence_length=32)


def _logits(model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora.model.gpt import positions_for

    return gather_from_tensor_model_parallel_region(model(IDS, positions_for(IDS), None))


def _against_peft(rank, world, tmp, label, targets):
    import torch.distributed as dist
    from peft import PeftModel

    from megatron_lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
    from megatron_lora.formats.convert import convert
    from megatron_lora.formats.xlora import expert_layers
    from megatron_lora.model.adapters import model_facts
    from oracle import hf_llama, lora_grads, peft_factors, peft_lora_tensors, peft_model

    out = {}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = apply_lora(_build(world), config)
    out["segments"] = {n: [s.name for s in m.lora_specs["default"].segments]
                       for n, m in (("output_layer", model.output_layer), ("embedding", model.embedding.word_embeddings))
                       if hasattr(m, "lora_specs")}
    logits = _logits(model)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * weight).sum().backward()
    facts = model_facts(model)
    hf = hf_llama(model, facts)
    pm = peft_model(hf, peft_lora_tensors(model), 4, 8, targets)
    ref = pm(IDS).logits
    (ref * weight).sum().backward()
    modules = dict(pm.base_model.model.named_modules())
    ours = lora_grads(model)
    out["grad_names"] = sorted(ours)
    out["grad_err"] = max(max(_rel(ga, peft_factors(modules[n])[0].grad), _rel(gb, peft_factors(modules[n])[1].grad))
                          for n, (ga, gb) in ours.items())
    out["logit_err"] = _rel(logits.detach(), ref.detach())

    # Our checkpoint -> PEFT: PEFT's own loader gives our logits; PEFT -> ours at TP=1 loads back exactly.
    d = f"{tmp}/{label}{world}"
    save_adapter(model, f"{d}_meg", config)
    hf_base = hf_llama(model, facts)  # gathers over TP: every rank
    failure = None
    if rank == 0:
        try:
            convert(f"{d}_meg", f"{d}_peft", "peft", progress=False)
            loaded = PeftModel.from_pretrained(hf_base, f"{d}_peft").eval()
            with torch.no_grad():
                out["peft_load_err"] = _rel(loaded(IDS).logits, logits.detach())
            out["peft_config"] = json.loads(open(f"{d}_peft/adapter_config.json").read())
            out["peft_keys"] = sorted(load_file(f"{d}_peft/adapter_model.safetensors"))
            convert(f"{d}_peft", f"{d}_back", "megatron", facts=facts, tp=1, progress=False)
        except Exception as e:  # re-raised after the barrier, which the other ranks wait at
            failure = e
    dist.barrier()
    if failure is not None:
        raise failure
    fresh = _build(world)
    load_adapter(fresh, f"{d}_back")
    with torch.no_grad():
        out["reload_exact"] = torch.equal(_logits(fresh), logits.detach())
        # Merge gives the same logits; unmerge restores the base weights bit for bit.
        weights = {n: p.detach().clone() for n, p in fresh.named_parameters() if n.endswith(".weight")}
        merge_lora(fresh)
        out["merged_err"] = _rel(_logits(fresh), logits.detach())
        unmerge_lora(fresh)
        out["unmerge_exact"] = all(torch.equal(p, weights[n]) for n, p in fresh.named_parameters() if n in weights)
    # X-LoRA mixes the layers' projections only: an expert on these modules is refused.
    try:
        expert_layers([f"{d}_back"], facts)
    except ValueError as e:
        out["xlora"] = str(e)
    return out


def _embedding_comm(world):
    """Collectives of the embedding's forward + backward without and with LoRA."""
    from test_lora_layers import _comm_of

    from megatron_lora import LoraConfig, apply_lora

    counts = []
    for lora in (False, True):
        model = _build(world)
        emb = model.embedding.word_embeddings
        if lora:
            apply_lora(model, LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False))
        emb.weight.requires_grad_(True)
        counts.append(_comm_of(lambda: emb(IDS).square().sum().backward())[:2])
    return counts


def _checks(rank, world, tmp):
    from megatron_lora import LoraConfig, apply_lora, init_distributed

    init_distributed(world, seed=5)
    out = {label: _against_peft(rank, world, tmp, label, targets) for label, targets in TARGET_SETS.items()}
    out["comm"] = _embedding_comm(world)
    # all-linear keeps PEFT's meaning: never the output layer, nor the embedding.
    every = apply_lora(_build(world), LoraConfig(r=2, target_modules="all-linear"))
    out["all_linear_output"] = hasattr(every.output_layer, "lora_specs") or hasattr(every.embedding.word_embeddings, "lora_specs")
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("lm_head"))
    return {world: run_ranks(_checks, world, tmp) for world in (1, 2)}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("label", list(TARGET_SETS))
def test_lora_matches_peft(results, world, label):
    segments = {"lm_head": {"output_layer": ["lm_head"]}, "embed_tokens": {"output_layer": ["lm_head"], "embedding": ["embed_tokens"]}}
    for r in results[world]:
        c = r[label]
        assert c["segments"] == segments[label]
        assert len(c["grad_names"]) == 5 if label == "lm_head" else 4, c["grad_names"]
        assert c["logit_err"] <= TOL and c["grad_err"] <= TOL, c
        assert c["reload_exact"] and c["merged_err"] <= TOL and c["unmerge_exact"]
        assert "an expert on" in c["xlora"]
    r0 = results[world][0][label]
    assert r0["peft_load_err"] <= TOL
    assert r0["peft_config"]["target_modules"] == TARGET_SETS[label]
    if label == "embed_tokens":
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in r0["peft_keys"]


@pytest.mark.parametrize("world", [1, 2])
def test_embedding_lora_adds_only_the_b_gradient_sum(results, world):
    for r in results[world]:
        (base_n, base_size), (lora_n, lora_size) = r["comm"]
        # One replicated-factor sum (B: hidden x r); no activation collective.
        assert (lora_n - base_n, lora_size - base_size) == ((1, 64 * 4) if world > 1 else (0, 0))


@pytest.mark.parametrize("world", [1, 2])
def test_all_linear_leaves_output_layer_and_embedding(results, world):
    for r in results[world]:
        assert not r["all_linear_output"]


def test_padded_vocabulary_converts_both_ways(tmp_path):
    """A vocabulary of 127 at TP=2: each rank holds 64 rows of B, the last one padding."""
    from megatron_lora.formats.convert import convert
    from megatron_lora.hf.layout import ModelFacts

    facts = ModelFacts(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, head_dim=8,
                       ffn_hidden_size=96, gated_linear_unit=True, vocab_size=127)
    src = tmp_path / "peft"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]}))
    g = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.lm_head.lora_A.weight": torch.randn(4, 64, generator=g),
               "base_model.model.lm_head.lora_B.weight": torch.randn(127, 4, generator=g)}
    save_file(tensors, str(src / "adapter_model.safetensors"))
    convert(src, tmp_path / "tp2", "megatron", facts=facts, tp=2, progress=False)
    ranks = [load_file(str(tmp_path / "tp2" / f"tp_rank_0{j}.safetensors")) for j in range(2)]
    b = tensors["base_model.model.lm_head.lora_B.weight"]
    assert torch.equal(ranks[0]["output_layer.lora_B.lm_head"], b[:64])
    assert torch.equal(ranks[1]["output_layer.lora_B.lm_head"][:63], b[64:])
    assert not ranks[1]["output_layer.lora_B.lm_head"][63].any()
    assert all(torch.equal(r["output_layer.lora_A.lm_head"], tensors["base_model.model.lm_head.lora_A.weight"]) for r in ranks)
    cfg = json.loads((tmp_path / "tp2" / "adapter_config.json").read_text())
    assert cfg["modules"] == {"output_layer": {"parallel": "column", "segments": {"lm_head": {"blocks": 1}}}}
    convert(tmp_path / "tp2", tmp_path / "tp1", "megatron", tp=1, progress=False)
    assert load_file(str(tmp_path / "tp1" / "tp_rank_00.safetensors"))["output_layer.lora_B.lm_head"].shape == (127, 4)
    convert(tmp_path / "tp2", tmp_path / "back", "peft", progress=False)
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
