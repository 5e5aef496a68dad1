"""LoRA on megatron-core's MoE experts (SequentialMLP) under expert parallelism and expert TP.

Every expert's linear_fc1 / linear_fc2 gets a LoRA with the same full factors (drawn per
GLOBAL expert index) at every layout; the loss is a fixed linear function of the logits of
one prompt that every rank holds. The experts' factor gradients, reduced as megatron-core's
DDP reduces expert parameters (a sum over the expert data-parallel group, scaled by
1 / data-parallel size; and by 1 / TP, see below) and gathered over expert TP, must equal those of the same experts
all on one rank (TP = EP = 1), to fp32 round-off. A replicated factor summed over the dense
TP group instead of the expert-TP group, or a second reduction of the experts' input
gradient or output, fails this. The collectives LoRA adds are only those sums.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from dist import run_ranks
from test_lora_layers import _CommLog
from test_moe_import import _prompt, tiny_qwen3_moe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

R, ALPHA = 4, 8
#: (TP, EP, expert TP) on 4 ranks; the first is the single-rank reference.
LAYOUTS = ((1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 2), (2, 2, 1))
TOL = 1e-5


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = tiny_qwen3_moe()
    path = tmp_path_factory.mktemp("moe_lora") / "qwen3_moe"
    hf.save_pretrained(path)
    return str(path), _prompt({"qwen3_moe": hf})


def _full_factors(layer: int, expert: int, hidden: int, ffn: int):
    g = torch.Generator().manual_seed(1000 * layer + expert)
    return {  # fc1: [gate; up] rows; fc2: down
        "fc1": (torch.randn(R, hidden, generator=g) * 0.3, torch.randn(2 * ffn, R, generator=g) * 0.3),
        "fc2": (torch.randn(R, ffn, generator=g) * 0.3, torch.randn(hidden, R, generator=g) * 0.3),
    }


def _add_expert_lora(model, hidden: int, ffn: int) -> dict:
    """LoRA "a" on every local expert, from the full factors; {(layer, expert, fc): layer}."""
    from megatron.core import parallel_state as ps
    from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, add_lora_support, shard_rows

    rank, world = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    layers = {}
    for layer in model.decoder.layers:
        for local, expert in enumerate(layer.mlp.experts.local_experts):
            key = (layer.layer_number - 1, layer.mlp.local_expert_indices[local])
            full = _full_factors(*key, hidden, ffn)
            for fc, module, blocks in (("fc1", expert.linear_fc1, 2), ("fc2", expert.linear_fc2, 1)):
                lora = add_lora_support(module)
                seg = Segment(name="all", r=R, scaling=ALPHA / R, width=module.weight.shape[0], blocks=blocks)
                lora.add_adapter("a", AdapterSpec(segments=(seg,)))
                a, b = full[fc]
                a = a if fc == "fc1" else a.chunk(world, 1)[rank]
                b = shard_rows(b, blocks, rank, world) if fc == "fc1" else b
                with torch.no_grad():
                    lora.lora_A["a"]["all"].copy_(a)
                    lora.lora_B["a"]["all"].copy_(b)
                layers[(*key, fc)] = lora
    return layers


def _gathered(t: torch.Tensor, dim: int, blocks: int, group) -> torch.Tensor:
    from megatron_lora.parallel.lora_layers import unshard_rows

    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return unshard_rows(parts, blocks) if dim == 0 else torch.cat(parts, 1)


def _body(rank, world, d, prompt):
    from megatron.core import parallel_state as ps
    from megatron_lora import init_distributed
    from megatron_lora.hf.importer import load_hf_base
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron_lora.model.gpt import positions_for

    ids = torch.tensor([prompt])
    out = {}
    for tp, ep, etp in LAYOUTS:
        init_distributed(tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        model, facts = load_hf_base(d)
        model.requires_grad_(False)
        # A trainable embedding makes the pass without LoRA run the whole backward too, so
        # the two passes' collectives compare.
        model.embedding.word_embeddings.weight.requires_grad_(True)
        layers = _add_expert_lora(model, facts.hidden_size, 32)
        weights = torch.randn(1, len(prompt), facts.vocab_size, generator=torch.Generator().manual_seed(5))

        def step():
            logits = gather_from_tensor_model_parallel_region(model(ids, positions_for(ids), None))
            (logits * weights).sum().backward()

        for lora in layers.values():
            lora.lora_disabled = True
        base_comm = Counter(_calls(step))
        for lora in layers.values():
            lora.lora_disabled = False
            for p in lora.parameters():
                p.grad = None
        lora_calls = _calls(step)
        r = out[(tp, ep, etp)] = {"extra": Counter(lora_calls) - base_comm, "missing": base_comm - Counter(lora_calls)}
        # megatron-core's DDP reduces parameters marked allreduce=False over the expert
        # data-parallel group: the factors must be marked as their expert's weight is.
        r["allreduce"] = {p.allreduce for lora in layers.values() for p in lora.parameters()}
        r["factor_sizes"] = sorted({p.numel() for lora in layers.values() for p in lora.parameters() if p.requires_grad})
        edp, etp_group = ps.get_expert_data_parallel_group(), ps.get_expert_tensor_parallel_group()
        # Without sequence parallelism every TP rank feeds the dispatcher the same tokens, so
        # each expert sees them TP times (megatron-core refuses to train MoE at TP > 1
        # without sequence parallelism for this reason; here the model is in eval mode).
        dp = ps.get_data_parallel_world_size() * tp
        grads = {}
        for (layer, expert, fc), lora in layers.items():
            ga, gb = (lora.lora_A["a"]["all"].grad.clone(), lora.lora_B["a"]["all"].grad.clone())
            for g in (ga, gb):  # what megatron-core's DDP does to an expert parameter (and / TP)
                torch.distributed.all_reduce(g, group=edp)
                g /= dp
            if fc == "fc1":
                r.setdefault("replicated_equal", []).append(torch.equal(ga, _gathered(ga, 0, 1, etp_group)[: ga.shape[0]]))
                grads[(layer, expert, fc)] = (ga, _gathered(gb, 0, 2, etp_group))
            else:
                grads[(layer, expert, fc)] = (_gathered(ga, 1, 1, etp_group), gb)
        r["grads"] = grads
        del model, layers
    return out


def _calls(step):
    log = _CommLog()
    try:
        step()
    finally:
        log.close()
    return log.calls


def test_expert_lora_gradients_match_one_rank(moe_dir):
    d, prompt = moe_dir
    ranks = run_ranks(_body, 4, d, prompt)
    ref = ranks[0][LAYOUTS[0]]["grads"]
    assert len(ref) == 2 * 4 * 2  # layers x experts x (fc1, fc2): all experts on one rank
    scale = max(max(a.abs().max().item(), b.abs().max().item()) for a, b in ref.values())
    assert scale > 0
    for layout in LAYOUTS[1:]:
        seen = set()
        for per_rank in ranks:
            r = per_rank[layout]
            for key, (ga, gb) in r["grads"].items():
                seen.add(key)
                ra, rb = ref[key]
                assert ga.shape == ra.shape and gb.shape == rb.shape, (layout, key)
                diff = max((ga - ra).abs().max().item(), (gb - rb).abs().max().item())
                assert diff <= TOL * scale, (layout, key, diff, scale)
            assert all(r["replicated_equal"])
        assert seen == set(ref), layout  # every expert is held by some rank
    for per_rank in ranks:
        for layout in LAYOUTS:
            r = per_rank[layout]
            # LoRA removes no collective, and adds only sums of replicated factor gradients
            # (none at expert TP 1, where the replicated factor is the whole factor).
            assert not r["missing"], (layout, r["missing"])
            assert all(name == "all_reduce" and n in r["factor_sizes"] for name, n in r["extra"]), (layout, r["extra"])
            assert bool(r["extra"]) == (layout[2] > 1), (layout, r["extra"])
            assert r["allreduce"] == {layout[1] == 1}, layout
