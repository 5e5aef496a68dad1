"""LoRA fine-tuning of a mixture of experts with megatron-core's load-balancing loss.

A tiny random Qwen3-MoE (4 experts, top-2), LoRA on the attention projections (upstream of
every router), every expert and the router, trained on the synthetic task with
``moe_aux_loss_coeff`` > 0:

- one process against 4 gloo ranks at TP x EP x expert-TP x SP = 1x2x1, 2x2x1+SP, 2x1x2+SP
  and 1x2x2, and 1x2x1 with 2 pipeline stages (one spawned group): per-step losses, load-balancing terms and gradient norms
  within 1e-5 relative, adapters within test_training.py's tolerance (1e-3 of each factor's
  largest entry);
- the scale of the load-balancing gradient: the engine's gradients (megatron-core's DDP,
  schedules and ``finalize_model_grads``) equal those of a plain loop that back-propagates
  the step's objective, token loss / labelled tokens + coefficient x the mean over
  micro-batches of the load-balancing loss, with the load-balancing term itself computed here
  from the routers' inputs (Switch Transformer's formula); a zero coefficient changes those
  gradients by far more than the tolerance, so a run that dropped the term, or scaled it
  as megatron-core does for per-token losses, fails.
"""

import json
from pathlib import Path

import pytest
import torch

from dist import run_ranks
from test_moe_import import COMMON, tiny_qwen3_moe

STEPS = 3
COEFF = 0.5
#: (TP, EP, expert TP, sequence parallel, PP) on 4 ranks.
LAYOUTS = ((1, 2, 1, False, 1), (2, 2, 1, True, 1), (2, 1, 2, True, 1), (1, 2, 2, False, 1), (1, 2, 1, False, 2))
#: Attention, every expert's projections and the router.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate"]
TOL = 1e-5


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory):
    torch.manual_seed(0)
    hf = tiny_qwen3_moe()
    path = tmp_path_factory.mktemp("moe_training") / "qwen3_moe"
    hf.save_pretrained(path)
    return str(path)


def _options(base, save, tp=1, ep=1, etp=None, sp=False, pp=1, **kw):
    from megatron_lora.runtime.training import FinetuneOptions

    values = dict(base=base, tiny=True, tp=tp, ep=ep, etp=etp, sequence_parallel=sp, pp=pp, train_iters=STEPS,
                  micro_batch_size=2, global_batch_size=8, seq_length=16, lr=1e-2, eval_interval=100,
                  eval_iters=1, target_modules=TARGETS, save=str(save), seed=7, moe_aux_loss_coeff=COEFF)
    return FinetuneOptions(**{**values, **kw})


def _run(base, root, name, *layout):
    from megatron_lora.formats.checkpoint import ShardReader
    from megatron_lora.runtime.training import finetune

    log = Path(root) / f"{name}.jsonl"
    result = finetune(_options(base, Path(root) / name, *layout, log_jsonl=str(log)))
    if torch.distributed.get_rank() != 0:
        return {"losses": result.losses}
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    reader = ShardReader(result.adapter)
    return {"losses": result.losses, "aux": [r["aux_loss"] for r in steps],
            "grad_norms": [r["grad_norm"] for r in steps], "adapter": {k: reader.full(k) for k in reader.keys()}}


def _single_body(rank, world, base, root):
    return {"run": _run(base, root, "single"),
            "grads": {coeff: _engine_and_plain_grads(base, coeff) for coeff in (COEFF, 0.0)}}


def _engine_and_plain_grads(base, coeff):
    """One step's gradients from the engine, and from a plain loop over the same micro-batches
    that back-propagates token loss / labelled tokens (+ coeff x mean load-balancing loss)."""
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler, Router

    from megatron_lora.config import LoraConfig
    from megatron_lora.model.gpt import real_vocab_size
    from megatron_lora.model.lora import apply_lora
    from megatron_lora.runtime.data import batch_indices, rank_micro_batches, stack_samples
    from megatron_lora.runtime.engine import Engine, token_losses
    from megatron_lora.runtime.tiny_task import counting_datasets
    from megatron_lora.runtime.training import load_base

    opts = _options(base, "unused", moe_aux_loss_coeff=coeff, clip_grad=0.0)  # clipping scales main_grad
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)

    def adapted():
        model = load_base(base, opts)
        apply_lora(model, lora, seed=1)
        return model

    model = adapted()
    train, _ = counting_datasets(opts.seq_length, real_vocab_size(model), opts.seed)
    engine = Engine(model, model, opts.settings(), train)
    report = engine.train_step()
    got = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = adapted().train()
    routers = [m for m in plain.modules() if isinstance(m, Router)]
    inputs = []
    for router in routers:
        router.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0].detach())))
    indices = batch_indices(len(train), opts.global_batch_size, 0, opts.seed)
    micro = rank_micro_batches(indices, 0, 1, opts.micro_batch_size)
    labelled = sum(train[i]["loss_mask"].sum() for i in indices)
    aux = 0.0
    for mb in micro:
        batch = stack_samples([train[i] for i in mb])
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([1.0 / len(micro)]))
        logits = plain(batch["tokens"], batch["position_ids"], None)
        ((token_losses(plain, logits, batch["labels"]) * batch["loss_mask"]).sum() / labelled).backward()
        for router, hidden in inputs:
            aux += coeff * _switch_loss(router, hidden) / len(micro)
        inputs.clear()
    want = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    return {"engine": got, "plain": want, "engine_aux": report.aux_loss, "plain_aux": aux,
            "routers": len(routers)}


def _switch_loss(router, hidden) -> float:
    """E x sum_i f_i P_i over one micro-batch's tokens: f_i the share of top-k slots routed
    to expert i, P_i the mean softmax probability of expert i."""
    with torch.no_grad():  # the router's logits (its LoRA term included)
        probs = torch.softmax(router.gating(hidden).reshape(-1, router.weight.shape[0]).float(), -1)
    experts, k = probs.shape[1], router.topk
    routed = torch.zeros_like(probs).scatter(1, probs.topk(k, -1).indices, 1.0)
    return (experts * (routed.mean(0) / k * probs.mean(0)).sum()).item()


def _group_body(rank, world, base, root):
    out = {layout: _run(base, root, "run{}{}{}{}{}".format(*map(int, layout)), *layout) for layout in LAYOUTS}
    try:
        _run(base, root, "no-sp", 2, 1, 2, False)
    except ValueError as e:
        out["no_sp"] = str(e)
    out["experts"] = _expert_checkpoint(base, Path(root) / "experts")
    return out


def _expert_checkpoint(base, save):
    """Expert LoRA factors at EP=2: a checkpoint after step 2 resumed into a fresh engine
    gives step 3's loss bitwise (each expert-parallel rank saves and restores its own experts)."""
    from megatron_lora.config import LoraConfig
    from megatron_lora.model.lora import apply_lora
    from megatron_lora.runtime.checkpoints import load_checkpoint, save_checkpoint
    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.runtime.engine import Engine
    from megatron_lora.runtime.tiny_task import counting_datasets
    from megatron_lora.runtime.training import load_base

    opts = _options(base, save, ep=2)
    init_distributed(1, expert_model_parallel_size=2)

    def engine():
        model = load_base(base, opts)
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=1)
        train, _ = counting_datasets(opts.seq_length, COMMON["vocab_size"], opts.seed)
        return Engine(model, model, opts.settings(), train)

    first = engine()
    first.train_step(), first.train_step()
    directory = save_checkpoint(first, save, 1, {})
    third = first.train_step().loss
    second = engine()
    load_checkpoint(second, save)
    return {"third": third, "resumed": second.train_step().loss,
            "files": sorted(f.name for f in directory.glob("state_*"))}


@pytest.fixture(scope="module")
def runs(moe_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_runs")
    single = run_ranks(_single_body, 1, moe_base, str(root))[0]
    group = run_ranks(_group_body, 4, moe_base, str(root))
    return single, group


def _close(got, ref, tol=TOL):
    got, ref = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return got.shape == ref.shape and torch.allclose(got, ref, rtol=tol, atol=0)


def test_layouts_match_one_process(runs):
    single, group = runs
    ref = single["run"]
    assert len(ref["losses"]) == STEPS and all(a > 0 for a in ref["aux"])
    for layout in LAYOUTS:
        got = group[0][layout]
        assert _close(got["losses"], ref["losses"]), (layout, got["losses"], ref["losses"])
        assert _close(got["aux"], ref["aux"]), (layout, got["aux"], ref["aux"])
        assert _close(got["grad_norms"], ref["grad_norms"]), (layout, got["grad_norms"], ref["grad_norms"])
        for rank in range(4):
            assert group[rank][layout]["losses"] == got["losses"], (layout, rank)
        assert got["adapter"].keys() == ref["adapter"].keys()
        for k, v in ref["adapter"].items():
            scale = v.abs().max().item()
            assert scale > 0, k
            assert (got["adapter"][k] - v).abs().max().item() <= 1e-3 * scale, (layout, k)


def test_load_balancing_gradient_scale(runs):
    grads = runs[0]["grads"]
    with_aux, without = grads[COEFF], grads[0.0]
    assert with_aux["routers"] == COMMON["num_hidden_layers"]
    # The logged term is the objective's, computed here from the routers' inputs.
    assert abs(with_aux["engine_aux"] - with_aux["plain_aux"]) <= TOL * with_aux["plain_aux"]
    assert without["engine_aux"] is None
    for run in (with_aux, without):
        scale = max(g.abs().max().item() for g in run["plain"].values())
        assert run["engine"].keys() == run["plain"].keys()
        for name, g in run["plain"].items():
            assert (run["engine"][name] - g).abs().max().item() <= TOL * scale, name
    # The load-balancing term moves the LoRA gradients upstream of the routers.
    scale = max(g.abs().max().item() for g in without["plain"].values())
    change = max((with_aux["plain"][n] - g).abs().max().item() for n, g in without["plain"].items())
    assert change > 1e-3 * scale, change


def test_expert_checkpoint_resumes(runs):
    for per_rank in runs[1]:
        experts = per_rank["experts"]
        assert experts["resumed"] == experts["third"]
    assert runs[1][0]["experts"]["files"] == ["state_etp00_ep00_pp00.safetensors", "state_etp00_ep01_pp00.safetensors",
                                              "state_tp00_pp00.safetensors"]


def test_tensor_parallel_moe_needs_sequence_parallel(runs):
    assert "--sequence-parallel" in runs[1][0]["no_sp"]


def test_moe_flags():
    from megatron_lora.cli.finetune import parse_options

    o = parse_options(["--tiny", "--tp", "2", "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size",
                       "1", "--sequence-parallel", "--moe-aux-loss-coeff", "0.01"])
    assert (o.tp, o.ep, o.etp, o.sequence_parallel, o.moe_aux_loss_coeff) == (2, 2, 1, True, 0.01)
    o = parse_options(["--tiny", "--ep", "4", "--etp", "2"])
    assert (o.ep, o.etp, o.sequence_parallel, o.moe_aux_loss_coeff) == (4, 2, False, 0.0)
    with pytest.raises(ValueError, match="--sequence-parallel needs"):
        parse_options(["--tiny", "--sequence-parallel"])
    with pytest.raises(ValueError, match="--seq-length 33"):
        parse_options(["--tiny", "--tp", "2", "--sequence-parallel", "--seq-length", "33"])
    with pytest.raises(ValueError, match="--moe-aux-loss-coeff"):
        parse_options(["--tiny", "--moe-aux-loss-coeff", "-1"])
    with pytest.raises(ValueError, match="--expert-model-parallel-size"):
        parse_options(["--tiny", "--ep", "0"])
    from megatron_lora.hf.importer import transformer_config_from_hf

    dense = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 intermediate_size=80, vocab_size=128)
    with pytest.raises(ValueError, match="needs a mixture-of-experts base"):
        transformer_config_from_hf(dense, tp=1, moe_aux_loss_coeff=0.01)
    moe = dict(dense, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    cfg, _ = transformer_config_from_hf(moe, tp=2, sequence_parallel=True, moe_aux_loss_coeff=0.01)
    assert (cfg.sequence_parallel, cfg.moe_router_load_balancing_type, cfg.moe_aux_loss_coeff) == (True, "aux_loss", 0.01)
    cfg, _ = transformer_config_from_hf(moe, tp=1)
    assert (cfg.sequence_parallel, cfg.moe_router_load_balancing_type) == (False, "none")
