"""Mixture-of-experts HF import (Qwen3-MoE, Mixtral) against single-device HF transformers.

One spawned group of 4 gloo ranks runs every layout (TP x EP x expert-TP): 1x1x1, 2x1x2,
1x2x1, 2x2x2 and 2x2x1. Tolerance as for dense models: fp32 logits within 1e-5 x max |logit|.
The prompt is chosen so that every token's k-th and (k+1)-th router probabilities are far
apart in every MoE layer: both sides then route the same tokens, and a wrong router (pre- vs
post-top-k softmax, a swapped gate / up, a wrong global expert index) moves the logits by far
more than the tolerance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lora.hf.importer import transformer_config_from_hf  # noqa: E402

TOL = 1e-5
NEW = 5
#: (TP, EP, expert TP) layouts on 4 ranks.
LAYOUTS = ((1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 2), (2, 2, 1))
#: Smallest allowed gap between the k-th and (k+1)-th router probability of any token.
MIN_GAP = 2e-3
COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, num_experts_per_tok=2)


def _perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF inits norms to 1 and the router to 0: perturb everything
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tiny_qwen3_moe():
    """The perturbed 4-expert, top-2 Qwen3-MoE (normalised top-k) the LoRA tests share."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return _perturbed(Qwen3MoeForCausalLM(Qwen3MoeConfig(
        num_experts=4, moe_intermediate_size=32, intermediate_size=80, norm_topk_prob=True, **COMMON)))


def _router_gap(model, ids: torch.Tensor, topk: int) -> float:
    """Smallest gap between the k-th and (k+1)-th softmax router probability over all tokens
    and MoE layers of ``model`` on ``ids``."""
    gaps = []

    def hook(module, args, out):
        probs = torch.softmax(torch.nn.functional.linear(args[0].reshape(-1, args[0].shape[-1]),
                                                         module.weight).float(), -1)
        top = probs.topk(topk + 1, -1).values
        gaps.append((top[:, topk - 1] - top[:, topk]).min().item())

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith(".gate")]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    assert len(gaps) == len(handles) > 0
    return min(gaps)


def _prompt(models: dict, length: int = 12) -> list[int]:
    for seed in range(200):
        ids = torch.randint(0, COMMON["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))
        if all(_router_gap(m, ids, COMMON["num_experts_per_tok"]) > MIN_GAP for m in models.values()):
            return ids[0].tolist()
    raise AssertionError("no prompt without near-tied router scores")


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    models = {
        # Qwen3-MoE's default routing (top-k of the softmax, not renormalised); layer 1 is a
        # dense MLP (mlp_only_layers) of another width than the experts.
        "qwen3_moe": Qwen3MoeForCausalLM(Qwen3MoeConfig(
            num_experts=8, moe_intermediate_size=32, intermediate_size=80, norm_topk_prob=False,
            mlp_only_layers=[1], head_dim=32, **COMMON)),
        "qwen3_moe_norm": Qwen3MoeForCausalLM(Qwen3MoeConfig(
            num_experts=4, moe_intermediate_size=48, intermediate_size=80, norm_topk_prob=True,
            tie_word_embeddings=True, **COMMON)),
        # Mixtral always renormalises the top-k.
        "mixtral": MixtralForCausalLM(MixtralConfig(num_local_experts=8, intermediate_size=32, **COMMON)),
    }
    models = {name: _perturbed(m) for name, m in models.items()}
    prompt = _prompt(models)
    dirs, refs = {}, {}
    ids = torch.tensor([prompt])
    for name, hf in models.items():
        hf.save_pretrained(root / name)
        dirs[name] = str(root / name)
        with torch.no_grad():
            tokens = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
            refs[name] = dict(logits=hf(ids).logits[0], tokens=tokens)
    return dirs, refs, prompt


def _ranks_body(rank, world, dirs, prompt):
    from megatron_lora import init_distributed
    from megatron_lora.hf.importer import hf_biases, load_hf_base, read_hf_config
    from megatron_lora.hf.layout import MOE_HF_NAMES, megatron_full_to_hf
    from megatron_lora.runtime.generation import forward_logits, generate

    ids = torch.tensor([prompt])
    out = {}
    for tp, ep, etp in LAYOUTS:
        init_distributed(tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        for name, d in dirs.items():
            model, facts = load_hf_base(d)
            r = out[(name, tp, ep, etp)] = {"logits": forward_logits(model, ids)[0]}
            if (tp, ep, etp) in ((1, 1, 1), (2, 2, 2)):
                r["tokens"] = generate(model, prompt, NEW)
            if (tp, ep, etp) == (1, 1, 1) and rank == 0:
                hf_config = read_hf_config(d)
                state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
                r["hf_state"] = megatron_full_to_hf(state, facts, hf_biases(hf_config),
                                                    MOE_HF_NAMES[hf_config["model_type"]])
            del model
    try:  # expert TP x EP must divide the world, as TP x PP must
        init_distributed(1, expert_model_parallel_size=3)
    except ValueError as e:
        out["ep_error"] = str(e)
    return out


def test_moe_import_matches_hf(moe_models):
    dirs, refs, prompt = moe_models
    ranks = run_ranks(_ranks_body, 4, dirs, prompt)
    assert "expert_model_parallel_size=3" in ranks[0]["ep_error"]
    for name, ref in refs.items():
        scale = ref["logits"].abs().max().item()
        for layout in LAYOUTS:
            for rank, per_rank in enumerate(ranks):
                r = per_rank[(name, *layout)]
                diff = (r["logits"] - ref["logits"]).abs().max().item()
                assert diff <= TOL * scale, (name, layout, rank, diff, scale)
                if "tokens" in r:
                    assert r["tokens"] == ref["tokens"], (name, layout, rank)
        # The name rules both ways: the TP=1 model written back under HF names is the file
        # save_pretrained wrote (per-expert tensors; no lm_head with tied embeddings).
        back = ranks[0][(name, 1, 1, 1)]["hf_state"]
        expected = load_file(Path(dirs[name]) / "model.safetensors")
        assert back.keys() == expected.keys(), (name, back.keys() ^ expected.keys())
        for k, v in expected.items():
            assert torch.equal(back[k], v), (name, k)


def test_generate_script_expert_parallel(moe_models, tmp_path):
    """generate.py under torchrun with the experts split over 2 ranks equals HF greedy."""
    dirs, refs, prompt = moe_models
    logits_out, tokens_out = tmp_path / "logits.safetensors", tmp_path / "tokens.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "generate.py"), "--base", dirs["mixtral"], "--expert-model-parallel-size", "2",
           "--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW),
           "--logits-out", str(logits_out), "--tokens-out", str(tokens_out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = refs["mixtral"]["logits"]
    assert (load_file(str(logits_out))["logits"] - ref).abs().max().item() <= TOL * ref.abs().max().item()
    assert json.loads(tokens_out.read_text()) == refs["mixtral"]["tokens"]


def _moe_config(**fields) -> dict:
    cfg = dict(model_type="qwen3_moe", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
               intermediate_size=80, vocab_size=128, num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=32)
    cfg.update(fields)
    return {k: v for k, v in cfg.items() if v is not None}  # None: the field is absent


def test_moe_config_fields_carried_over():
    cfg, _ = transformer_config_from_hf(_moe_config(norm_topk_prob=True, mlp_only_layers=[0]), tp=1)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size, cfg.ffn_hidden_size) == (8, 2, 32, 80)
    assert not cfg.moe_router_pre_softmax and cfg.moe_layer_freq == [0, 1, 1, 1] and cfg.qk_layernorm
    cfg, _ = transformer_config_from_hf(_moe_config(decoder_sparse_step=2), tp=1)
    assert cfg.moe_router_pre_softmax and cfg.moe_layer_freq == [0, 1, 0, 1]
    cfg, _ = transformer_config_from_hf(_moe_config(model_type="mixtral", num_experts=None, num_local_experts=4,
                                                    router_aux_loss_coef=0.5, output_router_logits=True), tp=2, ep=2)
    assert (cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.moe_router_pre_softmax) == (4, 80, False)
    assert (cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size) == (2, 2)
    assert cfg.moe_layer_freq == [1] * 4 and not cfg.qk_layernorm


@pytest.mark.parametrize("fields, message", [
    (dict(model_type="qwen2_moe"), "shared experts"),
    (dict(model_type="mixtral", router_jitter_noise=0.1), "router_jitter_noise"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    (dict(num_experts_per_tok=1, norm_topk_prob=True), "num_experts_per_tok=1"),
    (dict(num_experts=8, num_local_experts=4), "disagree"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(ep=3), "expert_model_parallel_size=3"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_moe_config_refusals(fields, message):
    ep = fields.pop("ep", 1)
    with pytest.raises(ValueError, match=message):
        transformer_config_from_hf(_moe_config(**fields), tp=1, ep=ep)


@pytest.mark.parametrize("fields, message", [
    (dict(moe_grouped_gemm=True), "moe_grouped_gemm"),
    (dict(moe_shared_expert_intermediate_size=32), "shared experts"),
    (dict(moe_token_dispatcher_type="alltoall"), "alltoall"),
])
def test_build_refuses_unsupported_moe(fields, message):
    from megatron_lora.model.gpt import check_moe_config, gpt_config

    if "moe_token_dispatcher_type" in fields and torch.cuda.is_available():
        pytest.skip("alltoall is refused only without CUDA")
    cfg = gpt_config(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=64,
                     num_moe_experts=4, moe_router_topk=2, **fields)
    with pytest.raises(ValueError, match=message):
        check_moe_config(cfg)
