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


def _checks(rank, world):
    from megatron_lora import init_distributed

    init_distributed(world, seed=3)
    out = {"exact": _exactness(world)}
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
def results():
    return run_ranks(_checks, 2)


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
