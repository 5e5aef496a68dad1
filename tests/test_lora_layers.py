"""Layer-level LoRA at TP=2 (real megatron-core over gloo): sequence parallelism (saving the
gathered input or only this rank's shard), dropout, bf16 bases, a count of every
collective against the base model, and the memory autograd saves under sequence parallelism.

References are plain single-device math on the full weights: y = x W^T + b + s (x A^T) B^T.
Tolerance: max |diff| <= 1e-5 x max |reference| (fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist import run_ranks

TOL = 1e-5
IN, OUT, R, SCALE = 32, 48, 4, 1.5


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _layers(world, sequence_parallel, dtype=torch.float32, dropout=0.0, shard=True):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_lora.model.gpt import gpt_config
    from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, add_lora_support

    cfg = gpt_config(1, IN, 4, OUT, tensor_model_parallel_size=world, sequence_parallel=sequence_parallel, params_dtype=dtype)
    init = torch.nn.init.normal_
    torch.manual_seed(1)
    col = ColumnParallelLinear(IN, OUT, config=cfg, init_method=init, bias=True, gather_output=False)
    row = RowParallelLinear(OUT, IN, config=cfg, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        col.bias.normal_(generator=torch.Generator().manual_seed(2))
        row.bias.normal_(generator=torch.Generator().manual_seed(3))
    for layer, out_local in ((col, OUT // world), (row, IN)):
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
        spec = AdapterSpec((Segment(name="x", r=R, scaling=SCALE, width=out_local),), dropout=dropout, init=False)
        add_lora_support(layer).add_adapter("default", spec)
        layer.lora_sp_shard_input = shard
    return col, row


def _full(t, dim):
    from oracle import gather_rows

    return gather_rows(t.detach(), dim)


def _gather_and_scatter_paths(rank, world):
    """gather_output + skip_bias_add on a column layer; input_is_parallel=False on a row."""
    col, row = _layers(world, False)
    col.gather_output, col.skip_bias_add = True, True
    row.input_is_parallel = False
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(6))
    h, h_bias = col(x)
    y, y_bias = row(h)
    W1, B1 = _full(col.weight, 0), _full(col.lora_B["default"]["x"], 0)
    A1 = col.lora_A["default"]["x"].detach()
    W2, A2 = _full(row.weight, 1), _full(row.lora_A["default"]["x"], 1)
    B2 = row.lora_B["default"]["x"].detach()
    hr = F.linear(x, W1) + SCALE * F.linear(F.linear(x, A1), B1)
    yr = F.linear(hr, W2, row.bias) + SCALE * F.linear(F.linear(hr, A2), B2)
    return {"h": _rel(h.detach(), hr), "y": _rel(y.detach(), yr.detach()),
            "bias_returned": torch.equal(h_bias.detach(), col.bias.detach()) and y_bias is None}


def _sp_and_grads(rank, world, sequence_parallel, shard=True, train_base=False):
    """Column then row layer (an MLP without activation) vs the full-weight math."""
    col, row = _layers(world, sequence_parallel, shard=shard)
    col.weight.requires_grad_(train_base)
    s, b = 8, 2
    x_full = torch.randn(s, b, IN, generator=torch.Generator().manual_seed(4))
    g_full = torch.randn(s, b, IN, generator=torch.Generator().manual_seed(5))
    x = (x_full.chunk(world, 0)[rank] if sequence_parallel else x_full).clone().requires_grad_(True)
    h, _ = col(x)
    y, _ = row(h)
    g = g_full.chunk(world, 0)[rank] if sequence_parallel else g_full
    (y * g).sum().backward()

    W1, b1 = _full(col.weight, 0), _full(col.bias, 0)
    A1, B1 = col.lora_A["default"]["x"], col.lora_B["default"]["x"]
    W2, b2 = _full(row.weight, 1), row.bias.detach()
    A2, B2 = row.lora_A["default"]["x"], row.lora_B["default"]["x"]
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in
           dict(A1=A1, B1=_full(B1, 0), A2=_full(A2, 1), B2=B2).items()}
    xr = x_full.clone().requires_grad_(True)
    hr = F.linear(xr, W1, b1) + SCALE * F.linear(F.linear(xr, ref["A1"]), ref["B1"])
    yr = F.linear(hr, W2, b2) + SCALE * F.linear(F.linear(hr, ref["A2"]), ref["B2"])
    (yr * g_full).sum().backward()
    y_full = torch.cat([t for t in [_full(y, 0)]], 0) if sequence_parallel else y.detach()
    gx = _full(x.grad, 0) if sequence_parallel else x.grad
    extra = {}
    if train_base:
        xr2 = x_full.reshape(-1, IN)
        gh = g_full.reshape(-1, IN).mm(W2 + SCALE * B2.detach().mm(_full(A2, 1)))
        extra["grad_W1"] = _rel(_full(col.weight.grad, 0), gh.t().mm(xr2))
    return extra | {
        "y": _rel(y_full, yr.detach()),
        "grad_x": _rel(gx, xr.grad),
        "grad_A1": _rel(A1.grad, ref["A1"].grad),
        "grad_B1": _rel(_full(B1.grad, 0), ref["B1"].grad),
        "grad_A2": _rel(_full(A2.grad, 1), ref["A2"].grad),
        "grad_B2": _rel(B2.grad, ref["B2"].grad),
        "A1": A1.detach().clone(),
        "B2": B2.detach().clone(),
    }


class _CommLog:
    """Wraps torch.distributed's collectives, and megatron-core's captured copies."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce_scatter", "all_to_all_single")

    def __init__(self):
        import torch.distributed as dist
        from megatron.core.tensor_parallel import layers, mappings

        self.calls = []
        self._restore = []
        for name in self.NAMES:
            self._wrap(dist, name, name)
        for mod in (mappings, layers):
            for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                if hasattr(mod, name):
                    self._wrap(mod, name, name)

    def _wrap(self, owner, attr, label):
        fn = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((label, max((t.numel() for t in tensors), default=0)))
            return fn(*args, **kwargs)

        setattr(owner, attr, wrapped)
        self._restore.append((owner, attr, fn))

    def close(self):
        for owner, attr, fn in self._restore:
            setattr(owner, attr, fn)

    def summary(self):
        return len(self.calls), sum(n for _, n in self.calls), tuple(self.calls)


def _comm_of(run):
    log = _CommLog()
    try:
        run()
    finally:
        log.close()
    return log.summary()


def _model_comm(world, tokens, lora):
    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for

    torch.manual_seed(0)
    model = build_gpt(gpt_config(2, 64, 8, 96, num_query_groups=2, tensor_model_parallel_size=world), 128, max_sequence_length=64)
    if lora:
        apply_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    # Gradients must flow through every layer in both models.
    model.embedding.word_embeddings.weight.requires_grad_(True)
    ids = torch.arange(tokens).reshape(1, tokens) % 128

    def run():
        model(ids, positions_for(ids), None).float().square().mean().backward()

    return _comm_of(run)


def _layer_comm(world, tokens, lora, shard=False):
    col, row = _layers(world, sequence_parallel=True, shard=shard)
    if not lora:
        for layer in (col, row):
            layer.lora_disabled = True
    x = torch.randn(tokens // world, 1, IN, requires_grad=True)

    def run():
        row(col(x)[0])[0].square().sum().backward()

    return _comm_of(run)


SAVED_TOKENS = 256


def _saved_bytes(world, shard):
    """Bytes of the distinct storages autograd saves in a sequence-parallel column layer's
    forward (frozen base, trainable LoRA, input requiring grad)."""
    col, _ = _layers(world, sequence_parallel=True, shard=shard)
    x = torch.randn(SAVED_TOKENS // world, 1, IN, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        col(x)
    return sum(storages.values())


def _generator_draw(world):
    """An adapter drawn from a seeded generator: the TP-split factors are slices of the TP=1
    draw from the same seed, whatever the default RNG's state."""
    from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, _initial_factors

    col, _ = _layers(world, False)
    seg = Segment(name="x", r=R, scaling=SCALE, width=OUT // world)
    torch.manual_seed(torch.distributed.get_rank())  # the default RNG differs per rank
    col.add_adapter("seeded", AdapterSpec((seg,), init=False), generator=torch.Generator().manual_seed(11))
    a, b = _initial_factors(seg, IN, OUT, False, torch.float32, torch.Generator().manual_seed(11))
    return torch.equal(col.lora_A["seeded"]["x"].detach(), a) and torch.equal(_full(col.lora_B["seeded"]["x"], 0), b)


def _checks(rank, world):
    from megatron.core import parallel_state as ps

    from megatron_lora import init_distributed

    init_distributed(world, seed=3)
    out = {"plain": _sp_and_grads(rank, world, False), "sp": _sp_and_grads(rank, world, True),
           "sp_gathered": _sp_and_grads(rank, world, True, shard=False),
           "sp_train_base": _sp_and_grads(rank, world, True, train_base=True),
           "paths": _gather_and_scatter_paths(rank, world)}
    out["comm_model"] = {(t, l): _model_comm(world, t, l) for t in (8, 16) for l in (False, True)}
    out["comm_layer_sp"] = {(t, l): _layer_comm(world, t, l) for t in (8, 16) for l in (False, True)}
    out["comm_layer_sp_shard"] = {t: _layer_comm(world, t, True, shard=True) for t in (8, 16)}
    out["saved_bytes"] = {shard: _saved_bytes(world, shard) for shard in (False, True)}
    out["generator_draw"] = _generator_draw(world)

    # Column dropout: the same mask on every TP rank, so TP=2 equals the full-tensor math
    # under the same default-RNG seed.
    col, _ = _layers(world, False, dropout=0.5)
    col.train()
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(123)
    y = _full(col(x)[0], 1)
    torch.manual_seed(123)
    xd = F.dropout(x, 0.5, True)
    W, bias = _full(col.weight, 0), _full(col.bias, 0)
    A, B = col.lora_A["default"]["x"].detach(), _full(col.lora_B["default"]["x"], 0)
    out["dropout_err"] = _rel(y, F.linear(x, W, bias) + SCALE * F.linear(F.linear(xd, A), B))
    out["dropout_changes_output"] = (y - (F.linear(x, W, bias) + SCALE * F.linear(F.linear(x, A), B))).abs().max().item()

    # bf16 base, fp32 adapters: bf16 output close to the fp32 math; merge round trip.
    col16, _ = _layers(world, False, dtype=torch.bfloat16)
    y16 = _full(col16(x.bfloat16())[0], 1)
    W16 = _full(col16.weight, 0).float()
    A16 = col16.lora_A["default"]["x"].detach()
    B16 = _full(col16.lora_B["default"]["x"], 0)
    out["bf16_dtype"] = str(y16.dtype) + "," + str(A16.dtype)
    out["bf16_err"] = _rel(y16.float(), F.linear(x, W16, _full(col16.bias, 0).float()) + SCALE * F.linear(F.linear(x, A16), B16))
    w0 = col16.weight.detach().clone()
    col16.merge()
    col16.unmerge()
    out["bf16_roundtrip"] = _rel(col16.weight.float(), w0.float())
    out["tp_rank"] = ps.get_tensor_model_parallel_rank()
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_checks, 2)


@pytest.mark.parametrize("mode", ["plain", "sp", "sp_gathered", "sp_train_base"])
def test_column_row_pair_matches_full_math(results, mode):
    for r in results:
        keys = ("y", "grad_x", "grad_A1", "grad_B1", "grad_A2", "grad_B2") + (("grad_W1",) if mode == "sp_train_base" else ())
        for key in keys:
            assert r[mode][key] <= TOL, (mode, key, r[mode][key])
    # Replicated factors: identical on both ranks.
    assert torch.equal(results[0][mode]["A1"], results[1][mode]["A1"])
    assert torch.equal(results[0][mode]["B2"], results[1][mode]["B2"])


def test_gather_output_skip_bias_and_unsplit_row_input(results):
    for r in results:
        assert r["paths"]["h"] <= TOL and r["paths"]["y"] <= TOL
        assert r["paths"]["bias_returned"]


@pytest.mark.parametrize("which", ["comm_model", "comm_layer_sp"])
def test_no_collective_grows_with_tokens(results, which):
    for r in results:
        c = r[which]
        extra_small = (c[(8, True)][0] - c[(8, False)][0], c[(8, True)][1] - c[(8, False)][1])
        extra_large = (c[(16, True)][0] - c[(16, False)][0], c[(16, True)][1] - c[(16, False)][1])
        assert c[(8, False)][0] > 0  # the base does communicate: the log sees it
        assert extra_small == extra_large, (c, extra_small, extra_large)
        # ... and the only additions are the replicated factors' gradient sums.
        assert extra_small[0] > 0


def test_sp_shard_input_adds_one_rank_r_reduce_scatter(results):
    """Keeping the shard: the same collectives as saving the gathered input, plus one
    reduce-scatter of [tokens, r] in the column layer's backward."""
    for r in results:
        for tokens in (8, 16):
            gathered = list(r["comm_layer_sp"][(tokens, True)][2])
            shard = list(r["comm_layer_sp_shard"][tokens][2])
            assert len(shard) == len(gathered) + 1
            extra = ("reduce_scatter_tensor", tokens * R)
            assert extra in shard and extra not in gathered
            shard.remove(extra)
            assert shard == gathered, (shard, gathered)


def test_sp_shard_input_saves_tp_times_less_input(results):
    for r in results:
        saved = r["saved_bytes"]
        # The [tokens, in] fp32 input: the whole of it, or this rank's half.
        assert saved[False] - saved[True] == SAVED_TOKENS * IN * 4 // 2, saved


def test_add_adapter_draws_from_the_given_generator(results):
    assert all(r["generator_draw"] for r in results)


def test_column_dropout_same_mask_on_all_ranks(results):
    for r in results:
        assert r["dropout_err"] <= TOL
        assert r["dropout_changes_output"] > 1e-3


def test_bf16_base_with_fp32_adapters(results):
    for r in results:
        assert r["bf16_dtype"] == "torch.bfloat16,torch.float32"
        assert r["bf16_err"] <= 2e-2  # bf16 has an 8-bit mantissa
        assert r["bf16_roundtrip"] <= 2 ** -7  # unmerge on bf16: within one bf16 ulp of max |W|
