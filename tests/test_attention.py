"""SDPA core attention against megatron-core's local DotProductAttention (fp32, CPU, gloo).

All checks run in one spawned TP=2 group: each rank holds 4 of 8 query heads and 1 of 2
key/value groups (GQA factor 4). Exact means max |diff| <= 1e-6 x max |reference|.
"""

from __future__ import annotations

import torch

from dist import run_ranks

EXACT = 1e-6
HEADS, GROUPS, DIM = 8, 2, 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _config(**kw):
    from megatron_lora.model.gpt import gpt_config

    return gpt_config(1, HEADS * DIM, HEADS, 96, num_query_groups=GROUPS, kv_channels=DIM,
                      tensor_model_parallel_size=2, **kw)


def _qkv(sq: int, sk: int, b: int, gen: torch.Generator, dk: int = DIM, dv: int = DIM, heads: int = HEADS // 2,
         groups: int = GROUPS // 2):
    q = torch.randn(sq, b, heads, dk, generator=gen, requires_grad=True)
    k = torch.randn(sk, b, groups, dk, generator=gen, requires_grad=True)
    v = torch.randn(sk, b, groups, dv, generator=gen, requires_grad=True)
    return q, k, v


def _grads(out: torch.Tensor, inputs, weight: torch.Tensor):
    return torch.autograd.grad((out * weight).sum(), inputs)


def _against_dot_product(out: dict) -> None:
    """Causal prefill with GQA, default and explicit softmax scale: outputs and gradients."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lora.parallel.attention import SDPAttention

    cfg = _config()
    gen = torch.Generator().manual_seed(10 + torch.distributed.get_rank())
    errs = []
    for scale in (None, 0.3):
        ours = SDPAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=scale)
        ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=scale)
        q, k, v = _qkv(11, 11, 2, gen)
        a, b = ours(q, k, v, None), ref(q, k, v, None)
        assert a.shape == b.shape == (11, 2, HEADS // 2 * DIM)
        w = torch.randn(a.shape, generator=gen)
        errs.append(_rel(a, b))
        errs += [_rel(x, y) for x, y in zip(_grads(a, (q, k, v), w), _grads(b, (q, k, v), w))]
    out["dpa_err"] = max(errs)
    # The scale is used: a wrong one moves the output.
    q, k, v = _qkv(5, 5, 1, gen)
    default = SDPAttention(cfg, 1, AttnMaskType.causal, "self")(q, k, v, None)
    scaled = SDPAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.3)(q, k, v, None)
    out["scale_moves"] = (default - scaled).abs().max().item()


def _decode_and_chunks(out: dict) -> None:
    """Queries fewer than keys are the LAST positions (bottom-right causal alignment)."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lora.parallel.attention import SDPAttention

    attn = SDPAttention(_config(), 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(20)
    q, k, v = _qkv(9, 9, 2, gen)
    with torch.no_grad():
        full = attn(q, k, v, None)
        errs = []
        for n in (1, 3, 8):
            # megatron-core's static inference passes no_mask once the cache holds the prompt.
            for mask_type in (None, AttnMaskType.no_mask):
                chunk = attn(q[-n:], k, v, None, attn_mask_type=mask_type)
                errs.append(_rel(chunk, full[-n:]))
        out["chunk_err"] = max(errs)
        # Top-left alignment (SDPA's is_causal) would differ: the check can fail.
        qt, kt, vt = (t.permute(1, 2, 0, 3) for t in (q[-3:], k, v))
        top_left = torch.nn.functional.scaled_dot_product_attention(
            qt, kt.repeat_interleave(4, 1), vt.repeat_interleave(4, 1), is_causal=True)
        out["top_left_differs"] = (top_left.permute(2, 0, 1, 3).reshape(3, 2, -1) - full[-3:]).abs().max().item()


def _packed(out: dict) -> None:
    """A block-diagonal causal mask over a packed batch equals separate sequences."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lora.parallel.attention import SDPAttention

    cfg = _config()
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(30)
    lengths = (4, 6, 3)
    s = sum(lengths)
    q, k, v = _qkv(s, s, 1, gen)
    allowed = torch.zeros(s, s, dtype=torch.bool)
    start = 0
    for n in lengths:
        allowed[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    mask = ~allowed.view(1, 1, s, s)  # megatron convention: True = masked
    with torch.no_grad():
        packed = attn(q, k, v, mask)
        start, parts = 0, []
        for n in lengths:
            sl = slice(start, start + n)
            parts.append(attn(q[sl], k[sl], v[sl], None))
            start += n
        out["packed_err"] = _rel(packed, torch.cat(parts))
        out["packed_dpa_err"] = _rel(packed, DotProductAttention(cfg, 1, AttnMaskType.causal, "self")(q, k, v, mask))
        out["unpacked_differs"] = (attn(q, k, v, None) - packed).abs().max().item()


def _dropout(out: dict) -> None:
    """q = k = 0 and one-hot values expose each dropped probability as an output entry."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lora.parallel.attention import SDPAttention

    p, sk = 0.25, 64
    attn = SDPAttention(_config(), 1, AttnMaskType.no_mask, "self", attention_dropout=p,
                        k_channels=DIM, v_channels=sk)
    q = torch.zeros(sk, 2, HEADS // 2, DIM)
    k = torch.zeros(sk, 2, GROUPS // 2, DIM)
    v = torch.eye(sk).view(sk, 1, 1, sk).expand(sk, 2, GROUPS // 2, sk)

    def run() -> torch.Tensor:
        return attn(q, k, v, None).view(sk, 2, HEADS // 2, sk)

    model_parallel_cuda_manual_seed(123)
    default_state = torch.get_rng_state()
    first = run()
    out["default_rng_untouched"] = bool(torch.equal(torch.get_rng_state(), default_state))
    kept = first > 0
    out["dropout_values_ok"] = bool(torch.allclose(first[kept], torch.tensor(1.0 / (sk * (1 - p)))))
    out["keep_rate"] = kept.float().mean().item()
    out["next_call_differs"] = not torch.equal(run(), first)
    model_parallel_cuda_manual_seed(123)
    out["dropout_repeats"] = bool(torch.equal(run(), first))
    out["dropout_mask"] = kept
    attn.eval()
    out["eval_no_dropout"] = bool(torch.allclose(run(), torch.full_like(first, 1.0 / sk)))


def _mla(out: dict) -> None:
    """Key and value head sizes of multi-latent attention (k_channels != v_channels)."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lora.parallel.attention import SDPAttention

    dk, dv, scale = 24, 12, 0.17
    attn = SDPAttention(_config(), 1, AttnMaskType.causal, "self", softmax_scale=scale, k_channels=dk, v_channels=dv)
    gen = torch.Generator().manual_seed(40)
    q, k, v = _qkv(7, 7, 2, gen, dk=dk, dv=dv, groups=HEADS // 2)  # MLA: one key/value head per query head
    with torch.no_grad():
        got = attn(q, k, v, None)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        ref = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).reshape(7, 2, -1)
    assert got.shape == (7, 2, HEADS // 2 * dv)
    out["mla_err"] = _rel(got, ref)


def _whole_model(out: dict) -> None:
    """GPTModel on our attention (build_gpt's default) vs the local spec, same weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for
    from megatron_lora.parallel.attention import SDPAttention, with_sdpa_attention

    cfg = gpt_config(2, 64, 8, 96, num_query_groups=2, tensor_model_parallel_size=2)
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = with_sdpa_attention(local)
    out["spec_copied"] = (local.submodules.self_attention.submodules.core_attention is DotProductAttention
                          and spec.submodules.self_attention.submodules.core_attention is SDPAttention)
    torch.manual_seed(3)
    ours = build_gpt(cfg, 128, max_sequence_length=64)
    ref = build_gpt(cfg, 128, max_sequence_length=64, layer_spec=local)
    ref.load_state_dict(ours.state_dict())
    out["default_is_sdpa"] = isinstance(ours.decoder.layers[0].self_attention.core_attention, SDPAttention)
    ids = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8, 0, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    logits = [gather_from_tensor_model_parallel_region(m(ids, positions_for(ids), None)) for m in (ours, ref)]
    weight = torch.randn(logits[0].shape, generator=torch.Generator().manual_seed(0))
    for x in logits:
        (x * weight).sum().backward()
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in (ours, ref)]
    out["model_logit_err"] = _rel(logits[0].detach(), logits[1].detach())
    out["model_grad_err"] = max(_rel(grads[0][n], g) for n, g in grads[1].items())


def _body(rank: int, world: int) -> dict:
    from megatron_lora import init_distributed

    init_distributed(2)
    out: dict = {}
    for check in (_against_dot_product, _decode_and_chunks, _packed, _dropout, _mla, _whole_model):
        check(out)
    return out


def test_sdpa_attention():
    results = run_ranks(_body, 2)
    for r in results:
        assert r["dpa_err"] <= EXACT, r["dpa_err"]
        assert r["scale_moves"] > 1e-3
        assert r["chunk_err"] <= EXACT and r["top_left_differs"] > 1e-3
        assert r["packed_err"] <= EXACT and r["packed_dpa_err"] <= EXACT and r["unpacked_differs"] > 1e-3
        assert r["dropout_values_ok"] and r["dropout_repeats"] and r["next_call_differs"] and r["eval_no_dropout"]
        assert r["default_rng_untouched"]
        # 32768 Bernoulli(0.75) draws: standard deviation 0.0024.
        assert abs(r["keep_rate"] - 0.75) < 0.015, r["keep_rate"]
        assert r["mla_err"] <= EXACT
        assert r["spec_copied"] and r["default_is_sdpa"]
        assert r["model_logit_err"] <= EXACT and r["model_grad_err"] <= 10 * EXACT, r
    # TP ranks hold different heads: each draws its own dropout mask from the model-parallel stream.
    assert not torch.equal(results[0]["dropout_mask"], results[1]["dropout_mask"])


def test_with_sdpa_attention_specs():
    """Layer, block and MLA specs get SDPAttention; the given spec is unchanged; others are refused."""
    import pytest
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from megatron_lora.parallel.attention import SDPAttention, with_sdpa_attention

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention

    mla = get_gpt_layer_local_spec(multi_latent_attention=True, normalization="RMSNorm")
    assert core(with_sdpa_attention(mla)) is SDPAttention and core(mla) is DotProductAttention
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    block = ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=[layer, layer]))
    new = with_sdpa_attention(block)
    assert [core(s) for s in new.submodules.layer_specs] == [SDPAttention, SDPAttention]
    assert core(layer) is DotProductAttention
    with pytest.raises(ValueError, match="no self_attention.core_attention"):
        with_sdpa_attention(ModuleSpec(module=torch.nn.Identity))
