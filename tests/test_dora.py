"""DoRA (``use_dora``) under tensor parallelism against HF + PEFT 0.21.2's DoRA.

One spawned 2-rank group runs every check at TP=2, then again at TP=1 (model parallelism
re-initialised): logits and the gradients of A, B and the magnitude on a tiny Llama with DoRA
on the seven projections (fused linear_qkv / linear_fc1 segments, row-parallel o_proj /
down_proj), on embed_tokens and on lm_head (a vocabulary of 127, padded to 128 at TP=2); merge and
unmerge; PEFT -> ours -> PEFT bit-exact and resharding TP=2 -> 1; shared-A DoRA exported to
PEFT (and dist_checkpointing TP=2 -> 1); LoRA dropout against PEFT's recomputed base product;
a plain adapter active before a DoRA one (PEFT rescales the running output); sequence
parallelism; bf16 bases in both precision modes; and the collective count. Outside the group:
PEFT-saved DoRA files through the converters and their checks, and ``finetune --use-dora``.

Every B is scaled after ``apply_lora`` so that each magnitude differs from its row norm (the
norm then changes the output, and a wrong norm cannot cancel against the magnitude).
Tolerance: max |diff| <= 1e-5 x max |reference| (fp32).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dist import run_ranks
from oracle import TOL

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS = {"linear": (PROJECTIONS, 128), "embed": (["embed_tokens"], 127), "lm_head": (["lm_head"], 127)}
SHARED = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 126, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
R, ALPHA = 4, 8


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _build(world, vocab):
    from megatron_lora.model.gpt import build_gpt, gpt_config

    torch.manual_seed(7)
    cfg = gpt_config(2, 64, 8, 96, num_query_groups=2, tensor_model_parallel_size=world)
    return build_gpt(cfg, vocab, max_sequence_length=32)


def _dora_model(world, targets, vocab):
    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.parallel.lora_layers import lora_layers

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False, use_dora=True)
    model = apply_lora(_build(world, vocab), config)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in layer.lora_B.parameters():
                p.mul_(0.5)
    return model, config


def _logits(model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora.model.gpt import positions_for, real_vocab_size

    return gather_from_tensor_model_parallel_region(model(IDS, positions_for(IDS), None))[..., : real_vocab_size(model)]


def _full_tensors(model, value):
    """HF module name -> full (A, B, magnitude) of every per-projection DoRA segment
    (``value`` maps a parameter to the tensor wanted: itself or its gradient)."""
    from megatron_lora.hf.layout import hf_module_name
    from megatron_lora.model.lora import iter_linear_modules
    from megatron_lora.parallel.lora_layers import LoraLayer
    from oracle import gather_rows

    out = {}
    for _, layer, _, module in iter_linear_modules(model):
        if not isinstance(module, LoraLayer):
            continue
        for seg in module.lora_specs["default"].segments:
            a, b, m = (value(getattr(module, f)["default"][seg.name]) for f in ("lora_A", "lora_B", "lora_magnitude_vector"))
            if module.parallel_mode == "column":
                b, m = gather_rows(b, 0), gather_rows(m, 0)
            else:
                a = gather_rows(a, 1)
            out[hf_module_name(layer, seg.name)] = (a, b, m)
    return out


def _unpadded(t, shape):
    """``t`` without the vocabulary padding rows or columns PEFT's ``shape`` lacks."""
    for dim, n in enumerate(shape):
        t = t.narrow(dim, 0, n)
    return t


def _peft_tensors(module):
    """PEFT's (A, B, magnitude) parameters of adapter "default" on a DoRA module."""
    m = module.lora_magnitude_vector["default"].weight
    if "default" in getattr(module, "lora_embedding_A", {}):
        return module.lora_embedding_A["default"], module.lora_embedding_B["default"], m
    return module.lora_A["default"].weight, module.lora_B["default"].weight, m


def _on_rank0(rank, fn):
    """Run ``fn`` on rank 0 while the others wait; a failure re-raises after the barrier."""
    import torch.distributed as dist

    failure = None
    if rank == 0:
        try:
            fn()
        except Exception as e:
            failure = e
    dist.barrier()
    if failure is not None:
        raise failure


def _against_peft(rank, world, tmp, label):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from megatron_lora import load_adapter, merge_lora, save_adapter, unmerge_lora
    from megatron_lora.formats.convert import convert
    from megatron_lora.model.adapters import model_facts
    from oracle import hf_llama

    targets, vocab = TARGET_SETS[label]
    out = {}
    model, config = _dora_model(world, targets, vocab)
    logits = _logits(model)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * weight).sum().backward()
    facts = model_facts(model)
    pm = get_peft_model(hf_llama(model, facts), PeftLoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                                               init_lora_weights=False, use_dora=True))
    modules = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for name, tensors in _full_tensors(model, lambda p: p.detach()).items():
            for ours, theirs in zip(tensors, _peft_tensors(modules[name])):
                theirs.copy_(_unpadded(ours, theirs.shape))
    ref = pm.eval()(IDS).logits
    (ref * weight).sum().backward()
    out["logit_err"] = _rel(logits.detach(), ref.detach())
    grads = _full_tensors(model, lambda p: p.grad)
    out["grad_names"] = sorted(grads)
    out["grad_err"] = {
        f"{n}.{f}": _rel(_unpadded(ours, theirs.grad.shape), theirs.grad)
        for n, g in grads.items() for f, ours, theirs in zip("ABm", g, _peft_tensors(modules[n]))
    }
    with pm.disable_adapter(), torch.no_grad():
        out["differs_from_base"] = _rel(pm(IDS).logits, ref.detach())

    # Merge gives the same logits; unmerge restores the base weights bit for bit.
    with torch.no_grad():
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
        merge_lora(model)
        out["merged_err"] = _rel(_logits(model), logits.detach())
        unmerge_lora(model)
        out["unmerge_exact"] = all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)

    # Ours -> PEFT (PEFT's loader gives our logits) -> ours at TP=1 -> PEFT again (bit-exact),
    # and ours at TP=world resharded to TP=1 equals the TP=1 conversion of the PEFT export.
    d = f"{tmp}/{label}{world}"
    save_adapter(model, f"{d}_meg", config)
    hf_base = hf_llama(model, facts)

    def convert_both_ways():
        convert(f"{d}_meg", f"{d}_peft", "peft", progress=False)
        loaded = PeftModel.from_pretrained(hf_base, f"{d}_peft").eval()
        with torch.no_grad():
            out["peft_load_err"] = _rel(loaded(IDS).logits, logits.detach())
        out["peft_config"] = json.loads(open(f"{d}_peft/adapter_config.json").read())
        peft_tensors = load_file(f"{d}_peft/adapter_model.safetensors")
        out["peft_keys"] = sorted(peft_tensors)
        convert(f"{d}_peft", f"{d}_back", "megatron", facts=facts, tp=1, progress=False)
        convert(f"{d}_back", f"{d}_again", "peft", progress=False)
        again = load_file(f"{d}_again/adapter_model.safetensors")
        out["peft_round_trip"] = again.keys() == peft_tensors.keys() and all(torch.equal(again[k], peft_tensors[k]) for k in again)
        convert(f"{d}_meg", f"{d}_tp1", "megatron", tp=1, progress=False)
        back, tp1 = load_file(f"{d}_back/tp_rank_00.safetensors"), load_file(f"{d}_tp1/tp_rank_00.safetensors")
        out["reshard_exact"] = back.keys() == tp1.keys() and all(torch.equal(back[k], tp1[k]) for k in back)
        out["magnitude_keys"] = sorted(k for k in tp1 if ".lora_magnitude_vector." in k)

    _on_rank0(rank, convert_both_ways)
    fresh = _build(world, vocab)
    load_adapter(fresh, f"{d}_back")
    with torch.no_grad():
        out["reload_exact"] = torch.equal(_logits(fresh), logits.detach())
    return out


def _shared_a(rank, world, tmp):
    """Megatron names: one DoRA over each fused module (shared A, one magnitude over the fused
    rows, gated linear_fc1 split in blocks) exports to per-projection PEFT DoRA exactly; and
    megatron-core's dist_checkpointing saves it at TP=2 and loads it at TP=1 (magnitudes
    sharded like B)."""
    import os

    from megatron.core import dist_checkpointing
    from peft import PeftModel

    from megatron_lora import apply_lora

    from megatron_lora import save_adapter
    from megatron_lora.formats.convert import convert
    from megatron_lora.model.adapters import model_facts
    from oracle import hf_llama

    model, config = _dora_model(world, SHARED, 128)
    with torch.no_grad():
        logits = _logits(model)
    d = f"{tmp}/shared{world}"
    save_adapter(model, f"{d}_meg", config)
    hf_base = hf_llama(model, model_facts(model))
    out = {}

    def export():
        convert(f"{d}_meg", f"{d}_peft", "peft", progress=False)
        with torch.no_grad():
            out["peft_load_err"] = _rel(PeftModel.from_pretrained(hf_base, f"{d}_peft").eval()(IDS).logits, logits)

    _on_rank0(rank, export)
    if world == 2:
        _on_rank0(rank, lambda: os.makedirs(f"{tmp}/shared_dist"))
        dist_checkpointing.save(model.sharded_state_dict(), f"{tmp}/shared_dist")
        torch.save(logits, f"{tmp}/shared_dist_logits.{rank}.pt")
    else:
        target = apply_lora(_build(world, 128), config)
        target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), f"{tmp}/shared_dist"))
        with torch.no_grad():
            out["dist_reload_err"] = _rel(_logits(target), torch.load(f"{tmp}/shared_dist_logits.{rank}.pt", weights_only=True))
    return out


def _dropout(world):
    """A column layer with DoRA and LoRA dropout in training: the same default-RNG mask as
    PEFT's, which recomputes the base product on the dropped-out input."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from megatron_lora.model.gpt import gpt_config
    from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, add_lora_support
    from oracle import gather_rows

    cfg = gpt_config(1, 32, 4, 48, tensor_model_parallel_size=world)
    torch.manual_seed(1)
    col = ColumnParallelLinear(32, 48, config=cfg, init_method=torch.nn.init.normal_, bias=True, gather_output=False)
    with torch.no_grad():
        col.bias.normal_(generator=torch.Generator().manual_seed(2))
    spec = AdapterSpec((Segment(name="x", r=R, scaling=2.0, width=48 // world),), dropout=0.5, init=False, dora=True)
    add_lora_support(col).add_adapter("default", spec)
    with torch.no_grad():
        col.lora_B["default"]["x"].mul_(3.0)
    col.train()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(123)
    y = col(x)[0]
    g = torch.randn(y.shape[0], 48, generator=torch.Generator().manual_seed(4))
    (y * g.chunk(world, 1)[ps.get_tensor_model_parallel_rank()]).sum().backward()

    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(32, 48))
    with torch.no_grad():
        net.proj.weight.copy_(gather_rows(col.weight.detach(), 0))
        net.proj.bias.copy_(gather_rows(col.bias.detach(), 0))
    pm = get_peft_model(net, PeftLoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], lora_dropout=0.5,
                                            init_lora_weights=False, use_dora=True))
    proj = pm.base_model.model.proj
    a, b, m = _peft_tensors(proj)
    with torch.no_grad():
        a.copy_(col.lora_A["default"]["x"])
        b.copy_(gather_rows(col.lora_B["default"]["x"].detach(), 0))
        m.copy_(gather_rows(col.lora_magnitude_vector["default"]["x"].detach(), 0))
    pm.train()
    torch.manual_seed(123)
    ref = pm(x)
    (ref * g).sum().backward()
    # What reusing the base output on the dropped-out input (no recompute) would give.
    with torch.no_grad():
        torch.manual_seed(123)
        xd, base = F.dropout(x, 0.5, True), proj.base_layer(x)
        no_recompute = base + proj.lora_magnitude_vector["default"](
            xd, lora_A=proj.lora_A["default"], lora_B=proj.lora_B["default"], scaling=proj.scaling["default"],
            base_layer=proj.base_layer, base_result=base)
    # A plain adapter active before the DoRA one: PEFT's DoRA then rescales the running output,
    # plain term included.
    plain = AdapterSpec((Segment(name="x", r=R, scaling=2.0, width=48 // world),), init=False)
    col.add_adapter("plain", plain, generator=torch.Generator().manual_seed(8))
    col.set_active_adapters(["plain", "default"])
    pm.add_adapter("plain", PeftLoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], init_lora_weights=False))
    with torch.no_grad():
        proj.lora_A["plain"].weight.copy_(col.lora_A["plain"]["x"])
        proj.lora_B["plain"].weight.copy_(gather_rows(col.lora_B["plain"]["x"].detach(), 0))
        pm.base_model.set_adapter(["plain", "default"])
        col.eval(), pm.eval()
        mixed = _rel(gather_rows(col(x)[0], 1), pm(x))
    return {
        "mixed": mixed,
        "y": _rel(gather_rows(y.detach(), 1), ref.detach()),
        "grad_m": _rel(gather_rows(col.lora_magnitude_vector["default"]["x"].grad, 0), m.grad),
        "grad_A": _rel(col.lora_A["default"]["x"].grad, a.grad),
        "dropout_matters": _rel(ref.detach(), no_recompute.detach()) > 1e-3,
    }


def _dora_pair(world, sequence_parallel=False, dtype=torch.float32):
    """test_lora_layers' column + row pair with a DoRA adapter "dora" (seeded, B scaled so
    m differs from the row norms) as the only active one."""
    from test_lora_layers import IN, OUT, _layers

    from megatron_lora.parallel.lora_layers import AdapterSpec, Segment

    col, row = _layers(world, sequence_parallel, dtype=dtype)
    for i, (layer, width) in enumerate(((col, OUT // world), (row, IN))):
        spec = AdapterSpec((Segment(name="x", r=R, scaling=1.5, width=width),), init=False, dora=True)
        layer.add_adapter("dora", spec, generator=torch.Generator().manual_seed(20 + i))
        layer.set_active_adapters(["dora"])
        with torch.no_grad():
            layer.lora_B["dora"]["x"].mul_(2.0)
    return col, row


def _layer_variants(rank, world):
    """Sequence parallelism gives the non-SP outputs and magnitude gradients; a bf16 base runs
    in both precision modes close to the fp32 math."""
    from megatron.core import parallel_state as ps

    from megatron_lora.parallel.lora_layers import configure_lora_layers
    from oracle import gather_rows
    from test_lora_layers import IN

    x = torch.randn(8, 2, IN, generator=torch.Generator().manual_seed(4))
    res = {}
    for sp in (False, True) if world > 1 else (False,):  # megatron-core refuses SP without TP
        col, row = _dora_pair(world, sp)
        xin = x.chunk(world, 0)[ps.get_tensor_model_parallel_rank()] if sp else x
        y = row(col(xin)[0])[0]
        y.square().sum().backward()
        res[sp] = (gather_rows(y.detach(), 0) if sp else y.detach(),
                   gather_rows(col.lora_magnitude_vector["dora"]["x"].grad, 0), row.lora_magnitude_vector["dora"]["x"].grad)
    out = {"sp": max(_rel(a, b) for a, b in zip(res[True], res[False])) if world > 1 else 0.0}
    ref = [layer.float() for layer in _dora_pair(world, dtype=torch.bfloat16)]
    with torch.no_grad():
        y32 = ref[1](ref[0](x)[0])[0]
        for mode in ("base", "fp32"):
            col, row = _dora_pair(world, dtype=torch.bfloat16)
            configure_lora_layers(torch.nn.ModuleList([col, row]), compute_dtype=mode)
            y16 = row(col(x.bfloat16())[0])[0]
            out[f"bf16_{mode}"] = (str(y16.dtype), _rel(y16.float(), y32))
    return out


def _layer_comm(world, dora):
    """Collectives of a column + row pair's forward and backward (no sequence parallelism)."""
    from test_lora_layers import IN, _comm_of, _layers

    col, row = _dora_pair(world) if dora else _layers(world, False)
    x = torch.randn(8, IN, requires_grad=True)
    y = []
    forward = _comm_of(lambda: y.append(row(col(x)[0])[0]))
    backward = _comm_of(lambda: y[0].square().sum().backward())
    return forward, backward


def _embedding_comm(world, dora):
    from megatron_lora import LoraConfig, apply_lora

    from test_lora_layers import _comm_of

    model = _build(world, 128)
    emb = model.embedding.word_embeddings
    apply_lora(model, LoraConfig(r=R, target_modules=["embed_tokens"], init_lora_weights=False, use_dora=dora))
    y = []
    forward = _comm_of(lambda: y.append(emb(IDS)))
    backward = _comm_of(lambda: y[0].square().sum().backward())
    return forward, backward


def _model_comm(world, dora):
    """Collectives of a whole model's forward and backward with LoRA / DoRA on all-linear."""
    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.model.gpt import positions_for
    from test_lora_layers import _comm_of

    model = apply_lora(_build(world, 128), LoraConfig(r=R, target_modules="all-linear", init_lora_weights=False, use_dora=dora))
    y = []
    forward = _comm_of(lambda: y.append(model(IDS, positions_for(IDS), None)))
    backward = _comm_of(lambda: y[0].float().square().mean().backward())
    return forward, backward


def _checks(rank, world, tmp):
    from megatron_lora import init_distributed

    out = {}
    for tp in (2, 1):  # one group of 2 ranks: TP=2, then two TP=1 replicas
        init_distributed(tp, seed=5)
        res = {label: _against_peft(rank, tp, tmp, label) for label in TARGET_SETS}
        res["shared"] = _shared_a(rank, tp, tmp)
        res["dropout"] = _dropout(tp)
        res["variants"] = _layer_variants(rank, tp)
        res["comm"] = {kind: {dora: fn(tp, dora) for dora in (False, True)}
                       for kind, fn in (("layers", _layer_comm), ("embedding", _embedding_comm), ("model", _model_comm))}
        out[tp] = res
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_checks, 2, str(tmp_path_factory.mktemp("dora")))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("label", list(TARGET_SETS))
def test_dora_matches_peft(results, tp, label):
    names = {"linear": 14, "embed": 1, "lm_head": 1}
    for r in results:
        c = r[tp][label]
        assert len(c["grad_names"]) == names[label], c["grad_names"]
        assert c["logit_err"] <= TOL, c["logit_err"]
        worst = max(c["grad_err"].items(), key=lambda kv: kv[1])
        assert worst[1] <= TOL, worst
        assert c["differs_from_base"] > 1e-2  # the adapter does change the logits
        assert c["merged_err"] <= TOL and c["unmerge_exact"]
        assert c["reload_exact"]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("label", list(TARGET_SETS))
def test_dora_converts_both_ways_bit_exact(results, tp, label):
    c = results[0][tp][label]
    assert c["peft_load_err"] <= TOL
    assert c["peft_config"]["use_dora"] is True
    assert c["peft_round_trip"] and c["reshard_exact"]
    magnitudes = [k for k in c["peft_keys"] if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == (14 if label == "linear" else 1)
    if label == "embed":
        assert magnitudes == ["base_model.model.model.embed_tokens.lora_magnitude_vector"]
        assert c["magnitude_keys"] == ["embedding.word_embeddings.lora_magnitude_vector.embed_tokens"]


@pytest.mark.parametrize("tp", [1, 2])
def test_shared_a_dora_exports_to_peft(results, tp):
    assert results[0][tp]["shared"]["peft_load_err"] <= TOL


def test_dist_checkpointing_reshards_magnitudes(results):
    assert all(r[1]["shared"]["dist_reload_err"] <= TOL for r in results)


@pytest.mark.parametrize("tp", [1, 2])
def test_dropout_recomputes_the_base_product_and_mixed_adapters(results, tp):
    for r in results:
        d = r[tp]["dropout"]
        assert d["y"] <= TOL and d["grad_m"] <= TOL and d["grad_A"] <= TOL and d["mixed"] <= TOL, d
        assert d["dropout_matters"]


@pytest.mark.parametrize("tp", [1, 2])
def test_sequence_parallel_and_bf16_bases(results, tp):
    for r in results:
        v = r[tp]["variants"]
        assert v["sp"] <= TOL, v
        for mode in ("base", "fp32"):
            dtype, err = v[f"bf16_{mode}"]
            assert dtype == "torch.bfloat16" and err <= 2e-2, (mode, v)


def test_collectives_one_small_all_reduce_per_row_layer_and_embedding(results):
    """TP=2: DoRA adds exactly one all-reduce of the row layer's output rows (32) or the
    embedding's hidden size (64) to the forward, and no collective to the backward (the row
    layer's replicated magnitude shares B's gradient sum); the column layer adds none."""
    from test_lora_layers import IN

    for r in results:
        for kind, rows in (("layers", IN), ("embedding", 64)):
            (plain_f, plain_b), (dora_f, dora_b) = (r[2]["comm"][kind][d] for d in (False, True))
            assert sorted(dora_f[2]) == sorted(list(plain_f[2]) + [("all_reduce", rows)]), (kind, plain_f, dora_f)
            assert dora_b[0] == plain_b[0] and dora_b[1] == plain_b[1] + rows, (kind, plain_b, dora_b)
        # The model (2 layers, all-linear): one [hidden] all-reduce per row layer (linear_proj,
        # linear_fc2), 4 in all, in the forward; the backward's collectives keep their count.
        (plain_f, plain_b), (dora_f, dora_b) = r[2]["comm"]["model"][False], r[2]["comm"]["model"][True]
        assert sorted(dora_f[2]) == sorted(list(plain_f[2]) + [("all_reduce", 64)] * 4), (plain_f, dora_f)
        assert dora_b[0] == plain_b[0] and dora_b[1] == plain_b[1] + 4 * 64, (plain_b, dora_b)
        for kind in ("layers", "embedding", "model"):  # TP=1: nothing at all
            assert all(c[0] == 0 for c in r[1]["comm"][kind][True])


def test_dora_files_checked_against_config_and_shapes(tmp_path, capsys):
    """A PEFT DoRA directory saved by PEFT converts to TP=2 and back bit-exact and loads onto
    the imported HF base with PEFT's logits; ``inspect`` shows DoRA; a missing or misshapen magnitude, or one without use_dora, is refused by name
    in PEFT files and in our checkpoints."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lora.cli.convert import verify
    from megatron_lora.cli.main import main as cli_main
    from megatron_lora.formats.checkpoint import shard_file
    from megatron_lora.formats.convert import base_facts, convert, describe

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                                        num_hidden_layers=2, vocab_size=128))
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(base, PeftLoraConfig(r=R, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    facts = base_facts(tmp_path / "base")
    convert(tmp_path / "peft", tmp_path / "meg", "megatron", facts=facts, tp=2, progress=False)
    convert(tmp_path / "meg", tmp_path / "back", "peft", progress=False)
    src, back = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert src.keys() == back.keys() and all(torch.equal(src[k], back[k]) for k in src)
    ranks = [load_file(str(shard_file(tmp_path / "meg", j))) for j in range(2)]
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    mq = "decoder.layers.0.self_attention.linear_qkv.lora_magnitude_vector.q_proj"
    md = "decoder.layers.0.mlp.linear_fc2.lora_magnitude_vector.down_proj"
    assert torch.equal(torch.cat([r[mq] for r in ranks]), src[q])  # split like q_proj's B rows
    d = "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"
    assert all(torch.equal(r[md], src[d]) for r in ranks)  # replicated like down_proj's B
    # convert --verify's check: our TP=1 model on the imported HF base gives HF + PEFT's logits.
    diff, scale = verify(tmp_path / "base", tmp_path / "peft", tmp_path / "meg")
    assert diff <= TOL * scale, (diff, scale)
    info = describe(tmp_path / "meg")
    assert info["use_dora"] is True
    assert info["parameters"] == sum(t.numel() for t in src.values())
    assert cli_main(["inspect", str(tmp_path / "meg")]) == 0
    assert "use_dora:     True" in capsys.readouterr().out

    def refused(directory, match, **kw):
        with pytest.raises(ValueError, match=match):
            convert(directory, tmp_path / "out", "megatron", **kw, progress=False)

    def peft_copy(name, drop=(), update=None, config=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        save_file({**{k: v for k, v in src.items() if k not in drop}, **(update or {})}, str(d / "adapter_model.safetensors"))
        return d

    refused(peft_copy("missing", drop=[q]), "no matching lora_magnitude_vector .use_dora is true.", facts=facts)
    refused(peft_copy("short", update={q: torch.ones(63)}), r"lora_magnitude_vector \[63\] does not match lora_B \[64, 4\]", facts=facts)
    refused(peft_copy("plain", config={"use_dora": False}), "is a DoRA magnitude, but use_dora is false", facts=facts)

    def meg_copy(name, rank_update):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text((tmp_path / "meg" / "adapter_config.json").read_text())
        for j, r in enumerate(ranks):
            tensors = {k: v for k, v in r.items() if rank_update.get(k, 0) is not None}
            tensors.update({k: v for k, v in rank_update.items() if v is not None and j == 1})
            save_file(tensors, str(shard_file(d, j)))
        return d

    refused(meg_copy("meg_short", {mq: torch.ones(31)}), r"lora_magnitude_vector\.q_proj has shape \[31\].*need \[32\]")
    refused(meg_copy("meg_missing", {md: None}), "the modules table and the tensors disagree")


def _initial_magnitudes(rank, world, base, seed, adapter):
    """The magnitudes ``apply_lora(seed=...)`` starts from on the tiny base (the same at any
    TP), and the trained ones of ``adapter`` resharded to TP=1."""
    from megatron_lora import apply_lora, init_distributed
    from megatron_lora.formats.checkpoint import ShardReader
    from megatron_lora.model.adapters import adapter_state_dict
    from megatron_lora.runtime.training import FinetuneOptions, load_base

    init_distributed(1, seed=seed)
    reader = ShardReader(adapter)
    model = apply_lora(load_base(base, FinetuneOptions(tiny=True)), reader.lora_config, seed=seed)
    start = {k: v for k, v in adapter_state_dict(model).items() if ".lora_magnitude_vector." in k}
    return {k: (v, reader.full(k)) for k, v in start.items()}


def test_finetune_use_dora_trains_and_saves_the_magnitudes(tmp_path):
    """``finetune --use-dora`` at TP=2: the loss falls, every magnitude moves from its
    initial row norm and is saved; the PEFT export is a DoRA adapter."""
    from test_finetune import _finetune

    from megatron_lora.runtime.tiny_task import write_tiny_base

    save, peft_dir = tmp_path / "run", tmp_path / "peft"
    start, final = _finetune("--tiny", "--tp", "2", "--steps", "6", "--seq-length", "16", "--save", str(save),
                             "--seed", "3", "--use-dora", "--export-peft", str(peft_dir))
    assert final < start, (start, final)
    write_tiny_base(tmp_path / "base", 3)
    got = run_ranks(_initial_magnitudes, 1, str(tmp_path / "base"), 3, str(save / "adapter"))[0]
    assert len(got) == 4 * 7  # 4 layers x 7 projections
    assert all(trained.shape == initial.shape and (trained - initial).abs().max() > 1e-4 for initial, trained in got.values())
    assert json.loads((peft_dir / "adapter_config.json").read_text())["use_dora"] is True
    assert sum(k.endswith(".lora_magnitude_vector") for k in load_file(str(peft_dir / "adapter_model.safetensors"))) == 28
