"""LoRA on megatron-core's real multi-latent attention (``MLASelfAttention``, local spec with
SDPA core attention, YaRN RoPE, q/kv latent norms) in a small GPTModel, over 2 gloo ranks.

The same seeded model and seeded adapter at TP=2, TP=2 with sequence parallelism and TP=1:
logits and every LoRA factor gradient (TP=2 gathered to full) agree to 1e-5 relative
(max |diff| <= 1e-5 x max |TP=1|); the replicated factors' gradients are the same on both TP
ranks; so do the gradients of the base ``linear_kv_down_proj`` weights (megatron-core 0.16.1
alone drops part of its RoPE key's gradient at TP > 1: ``megatron_lora.parallel.mla``). A TP=2
checkpoint loads at TP=1 bit for bit. LoRA adds no activation collective, only
one sum per replicated factor's gradient. A down projection built as megatron-core's
replicated ``Linear`` (not split over TP) is refused by name.

MLA's linears in the local spec: ``linear_q_down_proj``, ``linear_q_up_proj``,
``linear_kv_down_proj`` and ``linear_kv_up_proj`` are ColumnParallelLinear (the down
projections are split too: MLA all-gathers their outputs itself), ``linear_proj`` is a
RowParallelLinear.
"""

from __future__ import annotations

import pytest
import torch

from dist import run_ranks

TOL = 1e-5
MLA = ["linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj"]
TARGETS = MLA + ["linear_proj"]
LAYOUTS = ((2, False), (2, True), (1, False))  # (TP, sequence parallel)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _config(tp, sp=False):
    from megatron_lora.model.gpt import gpt_config

    # YaRN (MLA's default RoPE) with a scaling factor and mscale, so its softmax scale and
    # cos/sin scaling take part; the non-fused RoPE path (apply_rope_fusion needs TE's kernel).
    return gpt_config(2, 32, 4, 48, tensor_model_parallel_size=tp, sequence_parallel=sp,
                      multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=12, qk_head_dim=8,
                      qk_pos_emb_head_dim=4, v_head_dim=6, qk_layernorm=True, rope_type="yarn",
                      rotary_scaling_factor=4.0, original_max_position_embeddings=8, mscale=1.0,
                      mscale_all_dim=1.0)


def _model(tp, sp=False):
    from megatron_lora.model.gpt import build_gpt

    torch.manual_seed(0)  # CPU initialisation: the same full base weights at every TP size
    return build_gpt(_config(tp, sp), 64, max_sequence_length=32)


def _lora_config():
    from megatron_lora import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                      rank_pattern={"linear_kv_up_proj": 2}, alpha_pattern={r"decoder\.layers\.1\.self_attention\.linear_q_up_proj": 3})


def _full(p, value):
    """``value`` (the factor or its gradient) gathered to the full shape over TP."""
    from oracle import gather_rows

    return gather_rows(value, p.partition_dim) if getattr(p, "tensor_model_parallel", False) else value.clone()


def _logits(model, tokens=8):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora.model.gpt import positions_for

    ids = (torch.arange(2 * tokens).reshape(2, tokens) * 7) % 64
    return gather_from_tensor_model_parallel_region(model(ids, positions_for(ids), None))


def _layout(tp, sp, tmp):
    import json

    from megatron_lora import apply_lora, load_adapter, save_adapter
    from megatron_lora.formats.convert import convert
    from megatron_lora.parallel.lora_layers import lora_layers

    model = _model(tp, sp)
    config = _lora_config()
    apply_lora(model, config, seed=7)
    out = {"types": {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(tuple(TARGETS))},
           "styles": {n: m.parallel_mode for n, m in lora_layers(model)},
           "scalings": {n: m.lora_specs["default"].segments[0].scaling for n, m in lora_layers(model)}}
    # The base weight before the RoPE key's split too (megatron-core alone gets it wrong at TP=2).
    kv_down = {f"decoder.layers.{i}.self_attention.linear_kv_down_proj.weight": layer.self_attention.linear_kv_down_proj.weight
               for i, layer in enumerate(model.decoder.layers)}
    for w in kv_down.values():
        w.requires_grad_(True)
    logits = _logits(model)
    logits.square().mean().backward()
    out["logits"] = logits.detach()
    factors, grads = {}, {name: _full(w, w.grad) for name, w in kv_down.items()}
    for name, m in lora_layers(model):
        for seg in m.lora_specs["default"].segments:
            for kind in ("lora_A", "lora_B"):
                p = getattr(m, kind)["default"][seg.name]
                factors[f"{name}.{kind}"] = _full(p, p.detach())
                grads[f"{name}.{kind}"] = _full(p, p.grad)
    out["factors"], out["grads"] = factors, grads
    if tp == 2 and not sp:
        save_adapter(model, f"{tmp}/mla", config)
        if torch.distributed.get_rank() == 0:
            out["saved_facts"] = json.loads(open(f"{tmp}/mla/adapter_config.json").read())["model"]
            try:
                convert(f"{tmp}/mla", f"{tmp}/peft", "peft", progress=False)
            except ValueError as e:
                out["to_peft"] = str(e)
        torch.distributed.barrier()
    if tp == 1:  # the TP=2 checkpoint, loaded at TP=1 into a fresh model
        fresh = _model(1)
        load_adapter(fresh, f"{tmp}/mla")
        with torch.no_grad():
            out["loaded_logits"] = _logits(fresh)
        out["loaded_factors"] = {f"{n}.{k}": getattr(m, k)["default"][s.name].detach().clone()
                                 for n, m in lora_layers(fresh) for s in m.lora_specs["default"].segments
                                 for k in ("lora_A", "lora_B")}
    return out


def _comm(sp, tokens, lora):
    """Collectives of one forward + backward at TP=2: (count, elements, replicated factor sizes)."""
    from test_lora_layers import _comm_of

    from megatron_lora import apply_lora
    from megatron_lora.parallel.lora_layers import lora_layers

    model = _model(2, sp)
    replicated = []
    if lora:
        apply_lora(model, _lora_config(), seed=7)
        replicated = sorted(p.numel() for _, m in lora_layers(model) for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]
                            if not getattr(p, "tensor_model_parallel", False))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    # Gradients must flow through every layer in both models.
    model.embedding.word_embeddings.weight.requires_grad_(True)
    count, size, _ = _comm_of(lambda: _logits(model, tokens).square().mean().backward())
    return count, size, replicated


def _replicated_down_projection():
    """MLASelfAttention whose down projections are megatron-core's replicated ``Linear``
    (a torch Linear, not split over TP): LoRA must refuse them by name."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.parallel.attention import with_sdpa_attention
    from megatron_lora.parallel.lora_layers import lora_layers
    from megatron_lora.parallel.norms import with_torch_norms

    layer = with_torch_norms(with_sdpa_attention(get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)))
    spec = layer.submodules.self_attention
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, linear_q_down_proj=Linear, linear_kv_down_proj=Linear))
    try:
        build_module(spec, config=_config(2), layer_number=1)
    except ValueError as e:  # megatron-core >= 0.19 refuses this projection class itself
        return {"megatron_refuses": str(e)}
    out = {}
    down = ["linear_q_down_proj", "linear_kv_down_proj"]
    for key, kwargs in {"linear_kv_down_proj": dict(target_modules=["linear_kv_down_proj"]),
                        "linear_q_down_proj": dict(target_modules=["linear_q_down_proj", "linear_q_up_proj"]),
                        "up": dict(target_modules=["linear_q_up_proj", "linear_kv_up_proj"]),
                        "all_linear": dict(target_modules="all-linear"),
                        "all_linear_but_down": dict(target_modules="all-linear", exclude_modules=down)}.items():
        attention = build_module(spec, config=_config(2), layer_number=1)
        try:
            apply_lora(attention, LoraConfig(r=2, **kwargs))
            out[key] = sorted(n for n, _ in lora_layers(attention))
        except TypeError as e:
            out[key] = str(e)
    return out


def _checks(rank, world, tmp):
    from megatron_lora import init_distributed

    out = {}
    for tp, sp in LAYOUTS:
        init_distributed(tp, seed=3)
        out[(tp, sp)] = _layout(tp, sp, tmp)
        if tp == 2 and not sp:
            out["refusal"] = _replicated_down_projection()
            out["comm"] = {(s, t, l): _comm(s, t, l) for s in (False, True) for t in (8, 16) for l in (False, True)}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_checks, 2, str(tmp_path_factory.mktemp("mla")))


def test_real_mla_layer_and_its_parallel_styles(results):
    r = results[0][(2, False)]
    for i in (0, 1):
        a = f"decoder.layers.{i}.self_attention."
        assert {a + n: r["types"][a + n] for n in TARGETS} == {
            **{a + n: "LoraColumnParallelLinear" for n in MLA}, a + "linear_proj": "LoraRowParallelLinear"}
        assert {n: s for n, s in r["styles"].items() if n.startswith(a)} == {
            **{a + n: "column" for n in MLA}, a + "linear_proj": "row"}
    assert len(r["styles"]) == 10
    # rank_pattern and alpha_pattern on MLA names.
    a = "decoder.layers.{}.self_attention."
    assert results[0][(1, False)]["factors"][a.format(0) + "linear_kv_up_proj.lora_A"].shape == (2, 12)
    assert results[0][(1, False)]["factors"][a.format(1) + "linear_q_up_proj.lora_B"].shape == (4 * 12, 4)
    assert r["scalings"][a.format(1) + "linear_q_up_proj"] == 3 / 4 and r["scalings"][a.format(0) + "linear_q_up_proj"] == 8 / 4
    assert r["scalings"][a.format(0) + "linear_kv_up_proj"] == 8 / 2


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=["tp2", "tp2_sp"])
def test_tp2_matches_tp1(results, layout):
    for r in results:
        got, want = r[layout], r[(1, False)]
        assert got["logits"].shape == want["logits"].shape == (2, 8, 64)
        assert _rel(got["logits"], want["logits"]) <= TOL
        # Same seed: the TP=2 factors are slices of the TP=1 ones, bit for bit.
        assert got["factors"].keys() == want["factors"].keys() and len(want["factors"]) == 20
        assert all(torch.equal(got["factors"][k], want["factors"][k]) for k in want["factors"])
        assert got["grads"].keys() == want["grads"].keys() and len(want["grads"]) == 22
        errs = {k: _rel(got["grads"][k], want["grads"][k]) for k in want["grads"]}
        assert max(errs.values()) <= TOL, errs
        assert all(want["grads"][k].abs().max() > 0 for k in want["grads"])
    # Replicated factors' gradients were summed over TP: the same on both ranks.
    for k, g in results[0][layout]["grads"].items():
        assert torch.equal(g, results[1][layout]["grads"][k]), k


def test_tp2_checkpoint_loads_at_tp1(results):
    saved = results[0][(2, False)]
    # linear_proj takes heads x v_head_dim: the facts say so, and the shapes were checked.
    assert saved["saved_facts"]["v_head_dim"] == 6 and saved["saved_facts"]["num_attention_heads"] == 4
    assert "has no HF PEFT name" in saved["to_peft"] and "multi-latent attention" in saved["to_peft"]
    for r in results:
        want = r[(1, False)]
        assert want["loaded_factors"].keys() == want["factors"].keys()
        assert all(torch.equal(want["loaded_factors"][k], want["factors"][k]) for k in want["factors"])
        assert _rel(want["loaded_logits"], want["logits"]) <= TOL


def test_no_activation_collective_added(results):
    for r in results:
        c = r["comm"]
        for sp in (False, True):
            assert c[(sp, 8, False)][0] > 0
            replicated = c[(sp, 8, True)][2]
            # Column layers' A (MLA's four) and the row layer's B, in both layers.
            assert len(replicated) == 10
            for t in (8, 16):
                extra = (c[(sp, t, True)][0] - c[(sp, t, False)][0], c[(sp, t, True)][1] - c[(sp, t, False)][1])
                assert extra == (len(replicated), sum(replicated)), (sp, t, extra, replicated)


def test_replicated_down_projection_refused_by_name(results):
    for r in results:
        got = r["refusal"]
        if "megatron_refuses" in got:
            assert "Unsupported linear_q_down_proj" in got["megatron_refuses"], got
            continue
        for name in ("linear_kv_down_proj", "linear_q_down_proj"):
            assert f"matches '{name}', a megatron.core.post_training.modelopt.layers.Linear" in got[name], got[name]
        assert got["up"] == ["linear_kv_up_proj", "linear_q_up_proj"]
        # "all-linear" covers every torch Linear (PEFT's meaning): refused, not skipped.
        assert "target_modules='all-linear' matches 'linear_q_down_proj'" in got["all_linear"], got["all_linear"]
        assert got["all_linear_but_down"] == ["linear_kv_up_proj", "linear_proj", "linear_q_up_proj"]
