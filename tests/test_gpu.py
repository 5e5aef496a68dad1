"""On one CUDA GPU (marker ``gpu``, skipped without CUDA; ``scripts/gpu_check.sh`` runs them).

The oracle is HF + PEFT on the same GPU in fp32 with TF32 off; tolerance as everywhere:
max |diff| <= 1e-5 x max |logit|, gradients likewise relative to their own scale. Our side
runs in one spawned rank (NCCL, world size 1); the scripts run as subprocesses. TP > 1
needs one GPU per rank and stays with the gloo tests.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist import run_ranks
from oracle import TOL, save_random_peft_lora

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [3, 17, 99, 5, 64, 1, 120, 42, 7, 88, 23, 11]
NEW = 6
IDS = torch.tensor([PROMPT, list(range(1, 13))])
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: (r, lora_alpha, target_modules) of the X-LoRA experts.
EXPERTS = [(4, 8, ["q_proj", "v_proj", "down_proj"]), (2, 4, ["k_proj", "o_proj", "up_proj"])]
XLORA = dict(xlora_depth=2, xlora_size=32, layerwise_scalings=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _exact_fp32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny HF Llama, a PEFT LoRA on all seven projections, a PEFT X-LoRA over two experts,
    and HF + PEFT's fp32 CUDA logits, greedy tokens and scalings on the prompt."""
    from peft import XLoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lora.model.xlora import XLoraConfig as OurXLoraConfig
    from megatron_lora.formats.xlora import XLoraBundle, write_peft_xlora

    _exact_fp32()
    root = tmp_path_factory.mktemp("gpu")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, use_cache=False)  # PEFT's X-LoRA refuses a cache
    base = LlamaForCausalLM(cfg).float().eval()
    base.save_pretrained(root / "base")

    def lora(targets, r, alpha, seed, path):
        return save_random_peft_lora(base, path, seed, 0.3, r=r, lora_alpha=alpha, target_modules=targets)

    pm = lora(SEVEN, 4, 8, 1, root / "peft").cuda().eval()
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.no_grad():
        logits = pm(ids).logits[0].cpu()
        tokens = pm.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    experts = {}
    for i, (r, alpha, targets) in enumerate(EXPERTS):
        lora(targets, r, alpha, 10 + i, root / f"expert{i}")
        experts[str(i)] = str(root / f"expert{i}")
    xm = get_peft_model(copy.deepcopy(base), XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters=experts,
                                                         **XLORA)).eval()
    gen = torch.Generator().manual_seed(5)
    linears = [m for m in xm.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for m in linears:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
    bundle = XLoraBundle(OurXLoraConfig(hidden_size=64, adapters=experts, **XLORA),
                         [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears],
                         {k: Path(v) for k, v in experts.items()})
    write_peft_xlora(bundle, root / "xlora")
    xm = xm.cuda()
    with torch.no_grad():
        xlogits = xm(input_ids=ids).logits[0].cpu()
    xscalings = xm.get_latest_scalings()[0].cpu()
    return {"root": root, "base": str(root / "base"), "peft": str(root / "peft"), "xlora": str(root / "xlora"),
            "logits": logits, "tokens": tokens, "xlogits": xlogits, "xscalings": xscalings}


def _all_on_cuda(model) -> bool:
    return all(t.is_cuda for t in list(model.parameters()) + list(model.buffers()))


def _oracle(out: dict) -> None:
    """build_gpt on the GPU + all-linear LoRA: logits and LoRA gradients vs HF + PEFT on the GPU."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.model.adapters import model_facts
    from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for
    from oracle import hf_llama, lora_grads, peft_lora_tensors, peft_model
    from megatron_lora.parallel.attention import SDPAttention

    torch.manual_seed(7)
    model = build_gpt(gpt_config(2, 64, 8, 96, num_query_groups=2), 128, max_sequence_length=64)
    out["built_on_cuda"] = _all_on_cuda(model)
    out["sdpa"] = isinstance(model.decoder.layers[0].self_attention.core_attention, SDPAttention)
    model = apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out["lora_on_cuda"] = _all_on_cuda(model)
    ids = IDS.cuda()
    logits = gather_from_tensor_model_parallel_region(model(ids, positions_for(ids), None))
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).cuda()
    (logits * weight).sum().backward()
    pm = peft_model(hf_llama(model, model_facts(model)), peft_lora_tensors(model), 4, 8, SEVEN).cuda()
    ref = pm(ids).logits
    (ref * weight).sum().backward()
    modules = dict(pm.base_model.model.named_modules())
    out["logit_err"] = _rel(logits.detach(), ref.detach())
    out["grad_err"] = max(
        max(_rel(ga, modules[n].lora_A["default"].weight.grad), _rel(gb, modules[n].lora_B["default"].weight.grad))
        for n, (ga, gb) in lora_grads(model).items()
    )
    out["oracle_model"] = model


def _merge_and_dist_checkpoint(out: dict, tmp: str) -> None:
    """merge/unmerge on the GPU; megatron-core dist_checkpointing save and load."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora import LoraConfig, apply_lora, merge_lora, unmerge_lora
    from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for

    model = out.pop("oracle_model")
    ids = IDS.cuda()

    def logits(m):
        with torch.no_grad():
            return gather_from_tensor_model_parallel_region(m(ids, positions_for(ids), None))

    before = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    merge_lora(model)
    out["merged_err"] = _rel(logits(model), before)
    unmerge_lora(model)
    out["unmerge_exact"] = all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    os.makedirs(f"{tmp}/dist")
    dist_checkpointing.save(model.sharded_state_dict(), f"{tmp}/dist")
    torch.manual_seed(99)  # another init: the load must overwrite it
    target = apply_lora(build_gpt(gpt_config(2, 64, 8, 96, num_query_groups=2), 128, max_sequence_length=64),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), f"{tmp}/dist"))
    out["dist_reload_err"] = _rel(logits(target), before)


def _fusions(out: dict) -> None:
    """megatron-core's TE-free fusions (torch.compile SwiGLU, bias-dropout-add) vs unfused."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for

    ids = IDS.cuda()
    models = [build_gpt(gpt_config(2, 64, 8, 96, num_query_groups=2, fusions=f), 128, max_sequence_length=64)
              for f in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    weight = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(0)).cuda()
    logits = []
    for m in models:
        x = gather_from_tensor_model_parallel_region(m(ids, positions_for(ids), None))
        (x * weight).sum().backward()
        logits.append(x.detach())
    out["fused_logit_err"] = _rel(logits[1], logits[0])
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in models]
    out["fused_grad_err"] = max(_rel(grads[1][n], g) for n, g in grads[0].items())


def _bf16_step(out: dict) -> None:
    """Three AdamW steps of LoRA on a bf16 base: the loss falls, the base stays, all on the GPU."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for

    torch.manual_seed(3)
    model = build_gpt(gpt_config(2, 64, 8, 96, num_query_groups=2, params_dtype=torch.bfloat16), 128,
                      max_sequence_length=64)
    model = apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(1)).cuda()
    inputs, labels = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(4):
        logits = model(inputs, positions_for(inputs), None)  # [b, s, vocab / tp]
        loss = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                            labels.transpose(0, 1).contiguous()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out["bf16_losses"] = losses
    out["bf16_base_unchanged"] = all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    out["bf16_on_cuda"] = _all_on_cuda(model)


def _hf_import_generate_xlora(out: dict, d: dict) -> None:
    """load_hf_base + a PEFT adapter: logits and KV-cache greedy tokens; X-LoRA logits, scalings."""
    from megatron_lora.runtime.generation import forward_logits, generate
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.adapters import load_adapter
    from megatron_lora.model.xlora import load_xlora

    model, _ = load_hf_base(d["base"])
    out["import_on_cuda"] = _all_on_cuda(model)
    load_adapter(model, d["peft"])
    ids = torch.tensor([PROMPT])  # on the CPU: moved where it enters
    out["import_logit_err"] = _rel(forward_logits(model, ids)[0].cpu(), d["logits"])
    out["tokens"] = generate(model, PROMPT, NEW)
    xm = load_xlora(load_hf_base(d["base"])[0], d["xlora"]).eval()
    out["xlora_on_cuda"] = _all_on_cuda(xm)
    out["xlora_logit_err"] = _rel(forward_logits(xm, ids)[0].cpu(), d["xlogits"])
    out["xlora_scalings_err"] = _rel(xm.get_latest_scalings()[0].float().cpu(), d["xscalings"])
    out["xlora_generates"] = len(generate(xm, PROMPT, NEW)) == NEW


def _body(rank: int, world: int, d: dict, tmp: str) -> dict:
    from megatron_lora import init_distributed

    _exact_fp32()
    init_distributed(1, seed=11)
    out: dict = {}
    for check in (_oracle, lambda o: _merge_and_dist_checkpoint(o, tmp), _fusions, _bf16_step,
                  lambda o: _hf_import_generate_xlora(o, d)):
        check(out)
    return out


@pytest.fixture(scope="module")
def ours(dirs, tmp_path_factory):
    d = {k: v for k, v in dirs.items() if k != "root"}
    return run_ranks(_body, 1, d, str(tmp_path_factory.mktemp("gpu_ranks")))[0]


def test_tp1_exact_against_hf_peft_on_cuda(ours):
    assert ours["built_on_cuda"] and ours["lora_on_cuda"] and ours["sdpa"]
    assert ours["logit_err"] <= TOL, ours["logit_err"]
    assert ours["grad_err"] <= 1e-4, ours["grad_err"]


def test_merge_unmerge_and_dist_checkpointing(ours):
    assert ours["merged_err"] <= TOL and ours["unmerge_exact"]
    assert ours["dist_reload_err"] == 0.0


def test_fusions_exact(ours):
    assert ours["fused_logit_err"] <= TOL and ours["fused_grad_err"] <= 1e-4, ours


def test_bf16_training_step(ours):
    losses = ours["bf16_losses"]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0], losses
    assert ours["bf16_base_unchanged"] and ours["bf16_on_cuda"]


def test_hf_import_generation_and_xlora(ours, dirs):
    assert ours["import_on_cuda"] and ours["xlora_on_cuda"]
    assert ours["import_logit_err"] <= TOL
    assert ours["tokens"] == dirs["tokens"]
    assert ours["xlora_logit_err"] <= TOL and ours["xlora_scalings_err"] <= TOL
    assert ours["xlora_generates"]


def test_generate_script(dirs, tmp_path):
    logits_out, tokens_out = tmp_path / "logits.safetensors", tmp_path / "tokens.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--base", dirs["base"], "--adapter", dirs["peft"],
           "--tp", "1", "--input-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW),
           "--logits-out", str(logits_out), "--tokens-out", str(tokens_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    assert _rel(load_file(str(logits_out))["logits"], dirs["logits"]) <= TOL
    assert json.loads(tokens_out.read_text()) == dirs["tokens"]


def test_finetune_script(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--tp", "1", "--steps", "20", "--seed", "3",
           "--out", str(tmp_path / "adapter")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = re.findall(r"start loss ([0-9.]+) -> final loss ([0-9.]+)", proc.stdout)
    assert len(found) == 1 and float(found[0][1]) < float(found[0][0]) - 0.3, proc.stdout[-2000:]
