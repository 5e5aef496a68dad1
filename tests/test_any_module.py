"""LoRA on any module tree of megatron-core parallel linears (no TransformerLayer), at TP=2
over gloo: PEFT's matching on dotted names, MLA-shaped linears, a subclass, refusals, the
exact math against the same layers gathered to one device, and the collective count.

Reference: plain single-device math on the gathered full weights and factors,
y = x W^T + b + s (x A^T) B^T per layer. Tolerance: max |diff| <= 1e-5 x max |reference|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist import run_ranks

TOL = 1e-5
H, LAT, HEADS, FFN, R = 16, 8, 12, 24, 4


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _net(world):
    """An MLA-shaped attention block, two numbered MLP blocks, a ColumnParallelLinear
    subclass, a plain nn.Linear and an output layer, none inside a TransformerLayer."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_lora.model.gpt import gpt_config

    cfg = gpt_config(1, H, 4, FFN, tensor_model_parallel_size=world)
    init = nn.init.normal_

    def col(i, o, gather=False, bias=True):
        return ColumnParallelLinear(i, o, config=cfg, init_method=init, bias=bias, gather_output=gather)

    def row(i, o):
        return RowParallelLinear(i, o, config=cfg, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False)

    class MyColumn(ColumnParallelLinear):
        pass

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_q_down_proj = col(H, LAT, gather=True)
            self.linear_q_up_proj = col(LAT, HEADS)
            self.linear_kv_down_proj = col(H, LAT, gather=True)
            self.linear_kv_up_proj = col(LAT, HEADS)
            self.linear_proj = row(HEADS, H)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_fc1 = col(H, FFN)
            self.linear_fc2 = row(FFN, H)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention = Attention()
            self.layers = nn.ModuleList([Block(), Block()])
            self.mixer = MyColumn(H, H, config=cfg, init_method=init, bias=False, gather_output=True)
            self.head = nn.Linear(H, H)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()
            self.output_layer = col(H, 2 * H, gather=True, bias=False)

    torch.manual_seed(5)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    return net, MyColumn


def _forward(lin, x):
    """The net's computation, written once for the TP modules and for the full reference:
    ``lin(name, x)`` applies the named linear."""
    a = "encoder.self_attention."
    q = lin(a + "linear_q_up_proj", lin(a + "linear_q_down_proj", x))
    kv = lin(a + "linear_kv_up_proj", lin(a + "linear_kv_down_proj", x))
    h = x + lin(a + "linear_proj", q * kv)
    for i in range(2):
        b = f"encoder.layers.{i}."
        h = h + lin(b + "linear_fc2", F.gelu(lin(b + "linear_fc1", h)))
    return lin("output_layer", lin("encoder.mixer", h))


def _full_layer(m, adapter="default"):
    """Gathered (W, bias, [(A, B, scaling)]) of a (LoRA) parallel linear."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from oracle import gather_rows

    column = isinstance(m, ColumnParallelLinear)
    w = gather_rows(m.weight.detach(), 0 if column else 1)
    bias = None if m.bias is None else (gather_rows(m.bias.detach(), 0) if column else m.bias.detach())
    terms = []
    if adapter in getattr(m, "lora_specs", {}):
        for seg in m.lora_specs[adapter].segments:
            a, b = m.lora_A[adapter][seg.name].detach(), m.lora_B[adapter][seg.name].detach()
            a, b = (a, gather_rows(b, 0)) if column else (gather_rows(a, 1), b)
            terms.append((a.clone().requires_grad_(True), b.clone().requires_grad_(True), seg.scaling))
    return w, bias, terms


def _lora_grads(m, adapter="default"):
    from oracle import gather_rows

    out = []
    for seg in m.lora_specs[adapter].segments:
        ga, gb = m.lora_A[adapter][seg.name].grad, m.lora_B[adapter][seg.name].grad
        out.append((ga, gather_rows(gb, 0)) if m.parallel_mode == "column" else (gather_rows(ga, 1), gb))
    return out


def _exactness(world):
    from megatron_lora import LoraConfig, apply_lora, merge_lora, unmerge_lora
    from megatron_lora.parallel.lora_layers import lora_layers

    net, my_column = _net(world)
    config = LoraConfig(
        r=R, lora_alpha=6, init_lora_weights=False,
        target_modules=["linear_q_down_proj", "linear_kv_up_proj", "linear_proj", "linear_fc1", "linear_fc2", "mixer"],
        rank_pattern={"linear_kv_up_proj": 2}, alpha_pattern={r"layers\.1\.linear_fc2": 3},
    )
    apply_lora(net, config)
    out = {"adapted": sorted(n for n, _ in lora_layers(net)),
           "mixer_subclass": isinstance(net.encoder.mixer, my_column) and type(net.encoder.mixer).__name__,
           "ranks": {n: [s.r for s in m.lora_specs["default"].segments] for n, m in lora_layers(net)},
           "scalings": {n: m.lora_specs["default"].segments[0].scaling for n, m in lora_layers(net)}}
    modules = dict(net.named_modules())
    full = {n: _full_layer(m) for n, m in modules.items() if hasattr(m, "tp_group")}

    x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(7))
    xt = x.clone().requires_grad_(True)
    y = _forward(lambda n, v: modules[n](v)[0], xt)
    y.square().sum().backward()

    def ref_lin(name, v):
        w, bias, terms = full[name]
        out = F.linear(v, w, bias)
        for a, b, s in terms:
            out = out + s * F.linear(F.linear(v, a), b)
        return out

    xr = x.clone().requires_grad_(True)
    yr = _forward(ref_lin, xr)
    yr.square().sum().backward()
    out["y"] = _rel(y, yr)
    out["grad_x"] = _rel(xt.grad, xr.grad)
    errs = {}
    for name, m in lora_layers(net):
        for (ga, gb), (a, b, _) in zip(_lora_grads(m), full[name][2]):
            errs[name] = max(_rel(ga, a.grad), _rel(gb, b.grad))
    out["grad_lora"] = errs
    # Merge: same outputs; unmerge: the base weights back bit for bit.
    before = {n: m.weight.detach().clone() for n, m in lora_layers(net)}
    with torch.no_grad():
        y0 = _forward(lambda n, v: modules[n](v)[0], x)
        merge_lora(net)
        out["merged"] = _rel(_forward(lambda n, v: modules[n](v)[0], x), y0)
        unmerge_lora(net)
    out["unmerged_exact"] = all(torch.equal(before[n], m.weight) for n, m in lora_layers(net))
    return out


def _adapted(world, **kwargs):
    """Names adapted by a config on a fresh net, or the error's type and message."""
    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.parallel.lora_layers import lora_layers

    net, _ = _net(world)
    try:
        apply_lora(net, LoraConfig(r=2, **kwargs))
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return sorted(n for n, _ in lora_layers(net))


def _comm(world, tokens, lora):
    """Collectives of one forward + backward: (count, elements, LoRA layers' replicated sizes)."""
    from test_lora_layers import _comm_of

    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.parallel.lora_layers import lora_layers

    net, _ = _net(world)
    for p in net.parameters():
        p.requires_grad_(False)
    replicated = []
    if lora:
        apply_lora(net, LoraConfig(r=R, target_modules="all-linear", exclude_modules=["head"], init_lora_weights=False))
        for _, m in lora_layers(net):
            factors = m.lora_A if m.parallel_mode == "column" else m.lora_B
            replicated += [p.numel() for p in factors["default"].values()]
    modules = dict(net.named_modules())
    x = torch.randn(tokens, 1, H, requires_grad=True)
    count, size, _ = _comm_of(lambda: _forward(lambda n, v: modules[n](v)[0], x).square().sum().backward())
    return count, size, sorted(replicated)


def _round_trips(world, tmp):
    """Save the module tree's adapter (version 2), reshard it TP=2 -> 1, load both back; a
    version-1 directory of a GPT model (written here by the v1 key scheme) still loads."""
    import json

    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from megatron_lora import LoraConfig, apply_lora, load_adapter, save_adapter
    from megatron_lora.formats.convert import convert
    from megatron_lora.model.gpt import build_gpt, gpt_config
    from megatron_lora.parallel.lora_layers import lora_layers

    rank = dist.get_rank()
    out = {}
    net, _ = _net(world)
    config = LoraConfig(r=R, lora_alpha=6, init_lora_weights=False, rank_pattern={"mixer": 3},
                        target_modules=["linear_q_down_proj", "linear_proj", "linear_fc2", "mixer"])
    apply_lora(net, config)
    save_adapter(net, f"{tmp}/v2", config)
    full = {n: _full_layer(m)[2] for n, m in lora_layers(net)}
    if rank == 0:
        convert(f"{tmp}/v2", f"{tmp}/v2_tp1", "megatron", tp=1, progress=False)
        out["v2_config"] = json.loads(open(f"{tmp}/v2/adapter_config.json").read())
        tp1 = load_file(f"{tmp}/v2_tp1/tp_rank_00.safetensors")
        out["tp1_exact"] = all(
            torch.equal(tp1[f"{n}.lora_A.{n.rsplit('.', 1)[-1]}"], a) and torch.equal(tp1[f"{n}.lora_B.{n.rsplit('.', 1)[-1]}"], b)
            for n, [(a, b, _)] in full.items()
        ) and len(tp1) == 2 * len(full)
        try:
            convert(f"{tmp}/v2", f"{tmp}/peft", "peft", progress=False)
        except ValueError as e:
            out["to_peft"] = str(e)
    dist.barrier()
    modules = dict(net.named_modules())
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = _forward(lambda n, v: modules[n](v)[0], x)
    for source in ("v2", "v2_tp1"):
        fresh, _ = _net(world)
        load_adapter(fresh, f"{tmp}/{source}")
        fm = dict(fresh.named_modules())
        same = all(torch.equal(p, q) for (_, p), (_, q) in zip(sorted(net.named_parameters()), sorted(fresh.named_parameters())))
        with torch.no_grad():
            out[source] = (same, torch.equal(_forward(lambda n, v: fm[n](v)[0], x), want))

    # A GPT model: version-1 keys (the four modules of the LLaMA-family layout) load.
    gpt = build_gpt(gpt_config(2, 32, 4, 48, num_query_groups=2, tensor_model_parallel_size=world), 64, max_sequence_length=16)
    gconfig = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "linear_fc1", "down_proj"], init_lora_weights=False)
    apply_lora(gpt, gconfig)
    path = {"linear_qkv": "self_attention.linear_qkv", "linear_proj": "self_attention.linear_proj",
            "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}
    v1 = {}
    for name, m in lora_layers(gpt):
        layer, kind = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        for factor in ("lora_A", "lora_B"):
            for seg, p in getattr(m, factor)["default"].items():
                v1[f"decoder.layers.{layer}.{path[kind]}.{factor}.{seg}"] = p.detach().clone()
    if rank == 0:
        import os

        os.makedirs(f"{tmp}/v1")
        facts = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, head_dim=8,
                     ffn_hidden_size=48, gated_linear_unit=True, vocab_size=64)
        cfg = {"format": "megatron-lora", "version": 1, "kind": "lora", "tp_size": world, "model": facts,
               "lora_config": gconfig.to_dict()}
        open(f"{tmp}/v1/adapter_config.json", "w").write(json.dumps(cfg))
    dist.barrier()
    save_file({k: v.contiguous() for k, v in v1.items()}, f"{tmp}/v1/tp_rank_{rank:02d}.safetensors")
    dist.barrier()
    torch.manual_seed(0)
    gpt2 = build_gpt(gpt_config(2, 32, 4, 48, num_query_groups=2, tensor_model_parallel_size=world), 64, max_sequence_length=16)
    load_adapter(gpt2, f"{tmp}/v1")
    got = {}
    for name, m in lora_layers(gpt2):
        for factor in ("lora_A", "lora_B"):
            for seg, p in getattr(m, factor)["default"].items():
                got[f"{name}.{factor}.{seg}"] = p.detach()
    out["v1_loads"] = sorted(got) == sorted(v1) and all(torch.equal(got[k], v1[k]) for k in v1)
    # The same model saved today: version 2 with the same keys, and its modules' styles.
    save_adapter(gpt, f"{tmp}/gpt_v2", gconfig)
    if rank == 0:
        out["gpt_v2_keys_are_v1_keys"] = sorted(load_file(f"{tmp}/gpt_v2/tp_rank_00.safetensors")) == sorted(v1)
        out["gpt_v2_config"] = json.loads(open(f"{tmp}/gpt_v2/adapter_config.json").read())
    return out


def _checks(rank, world, tmp):
    from megatron_lora import init_distributed

    init_distributed(world, seed=3)
    out = {"exact": _exactness(world), "round_trips": _round_trips(world, tmp)}
    out["regex"] = _adapted(world, target_modules=r".*\.(linear_q_down_proj|linear_kv_up_proj)")
    out["layers"] = _adapted(world, target_modules=["linear_fc1"], layers_to_transform=[1])
    out["pattern"] = _adapted(world, target_modules=["linear_fc1"], layers_to_transform=[0], layers_pattern="other")
    out["all_linear"] = _adapted(world, target_modules="all-linear", exclude_modules=["linear_proj", "head"])
    out["full_name"] = _adapted(world, target_modules=["encoder.layers.0.linear_fc2"])
    out["plain_linear"] = _adapted(world, target_modules=["head", "linear_fc1"])
    out["nothing"] = _adapted(world, target_modules=["linear_qkv"])
    out["comm"] = {(t, l): _comm(world, t, l) for t in (8, 16) for l in (False, True)}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_checks, 2, str(tmp_path_factory.mktemp("any_module")))


def test_module_tree_matches_gathered_math(results):
    for r in results:
        e = r["exact"]
        a = "encoder.self_attention."
        assert e["adapted"] == sorted([a + "linear_q_down_proj", a + "linear_kv_up_proj", a + "linear_proj", "encoder.mixer"]
                                      + [f"encoder.layers.{i}.linear_fc{j}" for i in (0, 1) for j in (1, 2)])
        assert e["mixer_subclass"] == "LoraMyColumn"
        assert e["ranks"][a + "linear_kv_up_proj"] == [2] and e["ranks"]["encoder.mixer"] == [R]
        assert e["scalings"]["encoder.layers.1.linear_fc2"] == 3 / R and e["scalings"]["encoder.layers.0.linear_fc2"] == 6 / R
        assert e["y"] <= TOL and e["grad_x"] <= TOL, e
        assert len(e["grad_lora"]) == 8 and max(e["grad_lora"].values()) <= TOL, e["grad_lora"]
        assert e["merged"] <= TOL and e["unmerged_exact"]


def test_peft_matching_on_dotted_names(results):
    a = "encoder.self_attention."
    fc = [f"encoder.layers.{i}.linear_fc{j}" for i in (0, 1) for j in (1, 2)]
    for r in results:
        assert r["regex"] == [a + "linear_kv_up_proj", a + "linear_q_down_proj"]
        assert r["layers"] == ["encoder.layers.1.linear_fc1"]
        assert r["pattern"].startswith("ValueError") and "matched no module" in r["pattern"]
        # all-linear: every parallel linear but the output layer (as PEFT leaves lm_head out).
        assert r["all_linear"] == sorted([a + p for p in ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                                                          "linear_kv_up_proj")] + ["encoder.mixer"] + fc)
        assert r["full_name"] == ["encoder.layers.0.linear_fc2"]
        assert r["plain_linear"].startswith("TypeError") and "'encoder.head'" in r["plain_linear"]
        assert "torch.nn.modules.linear.Linear" in r["plain_linear"]
        assert "matched no module" in r["nothing"]


def test_no_activation_collective_added(results):
    for r in results:
        c = r["comm"]
        assert c[(8, False)][0] > 0
        for t in (8, 16):
            extra = (c[(t, True)][0] - c[(t, False)][0], c[(t, True)][1] - c[(t, False)][1])
            # One sum per replicated factor (its size, independent of the tokens), nothing else.
            replicated = c[(t, True)][2]
            assert extra == (len(replicated), sum(replicated)), (t, extra, replicated)


def test_version_2_checkpoint_saves_reshards_and_loads_any_module(results):
    a = "encoder.self_attention."
    rt = results[0]["round_trips"]
    cfg = rt["v2_config"]
    assert cfg["version"] == 2 and cfg["tp_size"] == 2 and "model" not in cfg
    assert cfg["modules"] == {
        a + "linear_q_down_proj": {"parallel": "column", "segments": {"linear_q_down_proj": {"blocks": 1}}},
        a + "linear_proj": {"parallel": "row", "segments": {"linear_proj": {"blocks": 1}}},
        "encoder.layers.0.linear_fc2": {"parallel": "row", "segments": {"linear_fc2": {"blocks": 1}}},
        "encoder.layers.1.linear_fc2": {"parallel": "row", "segments": {"linear_fc2": {"blocks": 1}}},
        "encoder.mixer": {"parallel": "column", "segments": {"mixer": {"blocks": 1}}},
    }
    assert rt["tp1_exact"]  # TP=2 -> 1: the gathered factors, bit for bit
    assert "has no HF PEFT name" in rt["to_peft"]
    for r in results:
        assert r["round_trips"]["v2"] == (True, True) and r["round_trips"]["v2_tp1"] == (True, True)


def test_version_1_directory_still_loads(results):
    for r in results:
        assert r["round_trips"]["v1_loads"]
    rt = results[0]["round_trips"]
    assert rt["gpt_v2_keys_are_v1_keys"]
    cfg = rt["gpt_v2_config"]
    assert cfg["version"] == 2 and cfg["model"]["num_layers"] == 2
    assert cfg["modules"]["decoder.layers.1.mlp.linear_fc1"] == {"parallel": "column", "segments": {"linear_fc1": {"blocks": 2}}}
    assert cfg["modules"]["decoder.layers.0.mlp.linear_fc2"] == {"parallel": "row", "segments": {"down_proj": {"blocks": 1}}}
    assert set(cfg["modules"]["decoder.layers.0.self_attention.linear_qkv"]["segments"]) == {"q_proj", "v_proj"}
