"""X-LoRA at TP=1 and TP=2 on real megatron-core (gloo, CPU) against PEFT's XLoraModel.

The oracle is PEFT 0.21.2's XLoraModel on a tiny random HF Llama (hidden 64, 2 layers,
8 heads / 2 kv heads) with three PEFT LoRA experts named "0".."2" that target different
modules with different ranks. Our side loads the same HF directory with ``load_hf_base``
and the same expert directories with ``apply_xlora``; the classifier weights are copied
from PEFT's. One spawned group per TP size runs every case; the two-rank group also
re-initialises as PP=2 (TP=1) for the pipeline check. The converters are checked on
directories written by PEFT's own save, by our writers, and by ``save_xlora``.
Tolerance: max |diff| <= 1e-5 x max |logit| (fp32); scalings and gradients likewise
relative to their own scale.
"""

from __future__ import annotations

import json

import pytest
import torch

from dist import run_ranks
from oracle import TOL, save_random_peft_lora

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8, 0, 31, 77, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])

#: (r, lora_alpha, target_modules, extra LoraConfig fields) of each expert.
EXPERTS = [
    (4, 8, ["q_proj", "v_proj", "down_proj"], {}),
    (2, 4, ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"], {"use_rslora": True}),
    (3, 6, ["v_proj", "up_proj", "down_proj"], {"rank_pattern": {"down_proj": 5}, "layers_to_transform": [1]}),
]
#: X-LoRA layers: per block the projections any expert targets (block 0 lacks none of
#: q,k,v,o,gate,up,down except via layers_to_transform of expert 2, which only adds).
N_LAYERS = 2 * 7

CASES = {
    "depth1": dict(xlora_depth=1),
    "depth1_layerwise_nosoftmax_spv05": dict(xlora_depth=1, layerwise_scalings=True, enable_softmax=False, scaling_pass_value=0.5),
    "depth2_layerwise_temp_topk": dict(xlora_depth=2, xlora_size=32, xlora_dropout_p=0.2, layerwise_scalings=True,
                                       softmax_temperature=0.5, top_k_lora=2),
    "depth3_softmax_topk_global_spvNone": dict(xlora_depth=3, xlora_size=16, xlora_dropout_p=0.0, enable_softmax=False,
                                               top_k_lora=2, enable_softmax_topk=True, global_scaling_weight=0.7,
                                               scaling_pass_value=None),
    "depth2_spv05_topk1": dict(xlora_depth=2, xlora_size=16, scaling_pass_value=0.5, top_k_lora=1, global_scaling_weight=1.3),
}
GRAD_CASE = "depth2_layerwise_temp_topk"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny HF Llama directory and three PEFT LoRA expert directories (non-zero B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("xlora")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                      max_position_embeddings=64, tie_word_embeddings=False, use_cache=False)
    base = LlamaForCausalLM(cfg).float().eval()
    base.save_pretrained(root / "base")
    base_logits = base(IDS).logits.detach()
    experts = {}
    for i, (r, alpha, targets, extra) in enumerate(EXPERTS):
        save_random_peft_lora(base, root / f"expert{i}", 10 + i, 0.1, r=r, lora_alpha=alpha,
                              target_modules=targets, **extra)
        experts[str(i)] = str(root / f"expert{i}")
    return {"base": str(root / "base"), "experts": experts, "base_logits": base_logits}


def _peft_case(dirs, case: dict, seed: int, save_to=None):
    """PEFT's logits, scalings and classifier (weight, bias) list (and grads) for one case.

    With ``save_to``, PEFT's own ``save_pretrained`` writes the X-LoRA model there.
    """
    from peft import XLoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(dirs["base"]).float().eval()
    spv = case.get("scaling_pass_value", 0.0)
    kwargs = {**case, "scaling_pass_value": 0.0 if spv is None else spv}
    pm = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters=dirs["experts"], **kwargs))
    if spv is None:
        pm.set_scaling_pass_value(None)
    pm.eval()
    classifier = pm.base_model.internal_xlora_classifier
    gen = torch.Generator().manual_seed(seed)
    linears = [m for m in classifier.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for m in linears:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.2)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    if save_to is not None:
        pm.save_pretrained(save_to)
    logits = pm(input_ids=IDS).logits
    out = {
        "logits": logits.detach(),
        "scalings": pm.get_latest_scalings().detach(),
        "classifier": [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears],
    }
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weight).sum().backward()
    out["grads"] = [(m.weight.grad.clone(), m.bias.grad.clone()) for m in linears]
    return out


def _ours(rank: int, world: int, base_dir: str, experts: dict, cases: dict, classifiers: dict, formats: dict) -> dict:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora import init_distributed
    from megatron_lora.model.gpt import positions_for
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.xlora import XLoraConfig, apply_xlora

    if world > 1 or not __import__("torch").distributed.is_initialized():
        init_distributed(world, seed=3)
    results = {}
    for name, case in cases.items():
        model, _ = load_hf_base(base_dir)
        config = XLoraConfig(**case)
        xm = apply_xlora(model, config, adapters=experts)
        xm.eval()
        xm.xlora_classifier.load_full_state(classifiers[name])
        logits = gather_from_tensor_model_parallel_region(xm(IDS, positions_for(IDS), None))
        res = {"logits": logits.detach(), "scalings": xm.get_latest_scalings().detach(), "n_layers": xm.n_layers,
               "classifier_numel": sum(p.numel() for p in xm.xlora_classifier.parameters()),
               "classifier_weight_numel": sum(lin.weight.numel() for lin in xm.xlora_classifier.linears),
               "trainable": sorted(n for n, p in xm.named_parameters() if p.requires_grad),
               "config_untouched": config == XLoraConfig(**case)}
        weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        (logits * weight).sum().backward()
        if name == GRAD_CASE:
            res["grads"] = [(lin.weight.grad.clone(), lin.bias.grad.clone()) for lin in xm.xlora_classifier.linears]
        results[name] = res
    results["api"] = _api_checks(xm)
    results["formats"] = _format_checks(world, base_dir, formats)
    if world == 2:
        results["pp2"] = _pipeline_logits(base_dir, experts, CASES[GRAD_CASE], classifiers[GRAD_CASE])
    return results


def _pipeline_logits(base_dir: str, experts: dict, case: dict, classifier) -> torch.Tensor | None:
    """The X-LoRA logits at PP=2 (TP=1): on the last stage; None on the first."""
    from megatron.core import parallel_state as ps

    from megatron_lora import init_distributed
    from megatron_lora.model.gpt import positions_for
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.xlora import XLoraConfig, apply_xlora

    init_distributed(1, 2, seed=3)
    model, _ = load_hf_base(base_dir)
    xm = apply_xlora(model.eval(), XLoraConfig(**case), adapters=experts).eval()
    xm.xlora_classifier.load_full_state(classifier)
    out = xm(IDS, positions_for(IDS), None)
    return {"logits": out.detach() if ps.is_pipeline_last_stage() else None, "n_layers": xm.n_layers,
            "scalings": xm.get_latest_scalings()}


def _format_checks(world: int, base_dir: str, formats: dict) -> dict:
    """load_xlora of each written directory; save_xlora at this TP size."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora.model.gpt import positions_for
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.xlora import load_xlora, save_xlora

    out = {}
    for tag, directory in formats["load"].items():
        model, _ = load_hf_base(base_dir)
        xm = load_xlora(model, directory).eval()
        out[tag] = gather_from_tensor_model_parallel_region(xm(IDS, positions_for(IDS), None)).detach()
    save_xlora(xm, f"{formats['save']}_tp{world}")
    return out


def _api_checks(xm) -> dict:
    """The scalings-log API and the setters, on the last case's model."""
    from megatron_lora.model.gpt import positions_for

    out = {}
    xm.enable_scalings_logging()
    for ids in (IDS, IDS[:, :5], IDS[:, :7], IDS[:, :5]):
        xm(ids, positions_for(ids), None)
    xm.disable_scalings_logging()
    xm(IDS, positions_for(IDS), None)
    out["log_shapes"] = [tuple(s.shape) for s in xm.get_scalings_log()]
    out["buckets"] = {k: v[0] for k, v in xm.get_bucketed_scalings_log().items()}
    xm.clear_scalings_log()
    out["log_after_clear"] = len(xm.get_scalings_log())
    xm.set_global_scaling_weight(0.0)
    out["global_weight"] = xm.get_global_scaling_weight()
    zero = xm(IDS, positions_for(IDS), None)
    xm.disable_adapter_layers()
    base = xm(IDS, positions_for(IDS), None)
    xm.enable_adapter_layers()
    xm.set_scaling_pass_value(None)
    out["spv_none"] = xm.config.scaling_pass_value
    out["zero_weight_is_base"] = torch.equal(zero, base)
    return out


FORMAT_CASES = ("depth1", GRAD_CASE)  # classifier entries misplaced by PEFT's save: all / some


@pytest.fixture(scope="module")
def runs(dirs, tmp_path_factory):
    """PEFT's results per case, the converted directories, and our TP=1 / TP=2 results."""
    from megatron_lora.formats.convert import base_facts
    from megatron_lora.formats.xlora import read_xlora, write_megatron_xlora, write_peft_xlora

    root = tmp_path_factory.mktemp("formats")
    oracle = {
        name: _peft_case(dirs, case, seed=100 + i, save_to=root / f"peft_saved_{name}" if name in FORMAT_CASES else None)
        for i, (name, case) in enumerate(CASES.items())
    }
    facts = base_facts(dirs["base"])
    load = {}
    for name in FORMAT_CASES:
        bundle = read_xlora(root / f"peft_saved_{name}")
        write_peft_xlora(bundle, root / f"intended_{name}")
        write_megatron_xlora(bundle, root / f"megatron_tp2_{name}", tp=2, facts=facts)
        write_megatron_xlora(read_xlora(root / f"megatron_tp2_{name}"), root / f"megatron_tp1_{name}", tp=1)
        load.update({f"{name}/peft_saved": str(root / f"peft_saved_{name}"),
                     f"{name}/megatron_tp2": str(root / f"megatron_tp2_{name}")})
    formats = {"load": load, "save": str(root / "saved")}
    classifiers = {name: o["classifier"] for name, o in oracle.items()}
    args = (dirs["base"], dirs["experts"], CASES, classifiers, formats)
    tp1 = run_ranks(_ours, 1, *args)[0]
    tp2 = run_ranks(_ours, 2, *args)
    return {"oracle": oracle, "tp1": tp1, "tp2": tp2, "root": root, "facts": facts}


def test_xlora_matches_peft(runs, dirs):
    oracle, tp1, tp2 = runs["oracle"], runs["tp1"], runs["tp2"]
    for name, ref in oracle.items():
        for tag, res in (("tp1", tp1), ("tp2 rank0", tp2[0]), ("tp2 rank1", tp2[1])):
            r = res[name]
            assert r["n_layers"] == N_LAYERS
            assert r["config_untouched"]  # apply_xlora copies the caller's config
            assert r["scalings"].shape == ref["scalings"].shape == (2, 12, N_LAYERS, 3)
            assert _rel(r["scalings"], ref["scalings"]) <= TOL, (name, tag, _rel(r["scalings"], ref["scalings"]))
            assert _rel(r["logits"], ref["logits"]) <= TOL, (name, tag, _rel(r["logits"], ref["logits"]))
        # The sharded classifier: each TP=2 rank holds half of every weight.
        assert tp2[0][name]["classifier_weight_numel"] * 2 == tp1[name]["classifier_weight_numel"]
        assert tp2[0][name]["classifier_numel"] < 0.6 * tp1[name]["classifier_numel"]
        assert all(n.startswith("xlora_classifier.") for n in tp1[name]["trainable"])
        # The experts change the output: the base model alone is far from PEFT's X-LoRA.
        assert _rel(dirs["base_logits"], ref["logits"]) > 1e-2
    for (gw, gb), (rw, rb) in zip(tp1[GRAD_CASE]["grads"], oracle[GRAD_CASE]["grads"]):
        assert _rel(gw, rw) <= TOL and _rel(gb, rb) <= TOL


def test_pipeline_parallel_matches_peft(runs):
    """PP=2: scalings from the last stage reach the first stage's layers."""
    ref = runs["oracle"][GRAD_CASE]
    first, last = runs["tp2"][0]["pp2"], runs["tp2"][1]["pp2"]
    assert first["n_layers"] == last["n_layers"] == N_LAYERS
    assert torch.equal(first["scalings"], last["scalings"])
    assert _rel(last["scalings"], ref["scalings"]) <= TOL
    assert _rel(last["logits"], ref["logits"]) <= TOL


def test_scalings_log_api(runs):
    api = runs["tp1"]["api"]
    assert api["log_shapes"] == [(2, 12, N_LAYERS, 3), (2, 5, N_LAYERS, 3), (2, 7, N_LAYERS, 3), (2, 5, N_LAYERS, 3)]
    assert api["buckets"] == {12: [0], 5: [1, 3], 7: [2]}
    assert api["log_after_clear"] == 0 and api["global_weight"] == 0.0
    assert api["zero_weight_is_base"]
    assert api["spv_none"] == pytest.approx(1 / 3)


def _same_classifier(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def _file_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_formats_round_trip(runs, dirs):
    """PEFT's own save is read correctly; every conversion keeps every tensor bit for bit."""
    from megatron_lora.formats.xlora import read_xlora, write_peft_xlora

    root = runs["root"]
    for name in FORMAT_CASES:
        ref = runs["oracle"][name]["classifier"]
        saved = read_xlora(root / f"peft_saved_{name}")
        assert _same_classifier(saved.classifier, ref)
        # PEFT's expert subfolders are not the experts: the originals are used.
        assert [str(p) for p in saved.experts.values()] == list(dirs["experts"].values())
        for layout in ("intended", "megatron_tp2", "megatron_tp1"):
            assert _same_classifier(read_xlora(root / f"{layout}_{name}").classifier, ref), (name, layout)
        back = root / f"back_{name}"
        write_peft_xlora(read_xlora(root / f"megatron_tp1_{name}"), back)
        for i, src in enumerate(dirs["experts"].values()):
            orig = _file_tensors(f"{src}/adapter_model.safetensors")
            for layout in ("intended", "back"):
                new = _file_tensors(root / f"{layout}_{name}" / str(i) / "adapter_model.safetensors")
                assert orig.keys() == new.keys() and all(torch.equal(orig[k], new[k]) for k in orig)
        for world in (1, 2):
            assert _same_classifier(read_xlora(root / f"saved_tp{world}").classifier, runs["oracle"][FORMAT_CASES[-1]]["classifier"])
        # Loaded on a model, every layout gives PEFT's logits (at TP=1 and TP=2).
        for res in (runs["tp1"], runs["tp2"][0]):
            for layout in ("peft_saved", "megatron_tp2"):
                got = res["formats"][f"{name}/{layout}"]
                assert _rel(got, runs["oracle"][name]["logits"]) <= TOL, (name, layout)


def test_intended_layout_loads_in_peft(runs, dirs, monkeypatch):
    """PeftModel.from_pretrained (run from inside the directory) gives the original logits."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    for name in FORMAT_CASES:
        directory = runs["root"] / f"intended_{name}"
        monkeypatch.chdir(directory)  # PEFT resolves expert paths against the working directory
        pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(dirs["base"]).float(), str(directory)).eval()
        assert _rel(pm(input_ids=IDS).logits.detach(), runs["oracle"][name]["logits"]) <= TOL


def test_original_xlora_package_layout(runs, dirs, tmp_path):
    from safetensors.torch import save_file

    from megatron_lora.formats.xlora import read_xlora

    ref = runs["oracle"][GRAD_CASE]["classifier"]
    case = CASES[GRAD_CASE]
    config = {"hidden_size": 64, "device": "cpu", "use_bias": True, "enable_relu_and_dropout": True,
              "stop_token_id": None, "adapters": dirs["experts"], **case}
    (tmp_path / "xlora_config.json").write_text(json.dumps(config))
    save_file({"inner.0.weight": ref[0][0], "inner.0.bias": ref[0][1], "last.weight": ref[1][0], "last.bias": ref[1][1]},
              str(tmp_path / "xlora_classifier.safetensors"))
    assert _same_classifier(read_xlora(tmp_path).classifier, ref)
    (tmp_path / "xlora_config.json").write_text(json.dumps({**config, "enable_relu_and_dropout": False}))
    with pytest.raises(ValueError, match="enable_relu_and_dropout"):
        read_xlora(tmp_path)


def test_bad_input(runs, dirs, tmp_path):
    import dataclasses

    from megatron_lora.formats.xlora import check_bundle, read_xlora, write_megatron_xlora

    bundle = read_xlora(runs["root"] / f"intended_{GRAD_CASE}")
    two = dict(list(bundle.experts.items())[:2])
    with pytest.raises(ValueError, match="disagree"):
        check_bundle(dataclasses.replace(bundle, experts=two))
    config = dataclasses.replace(bundle.config, adapters={k: bundle.config.adapters[k] for k in two})
    with pytest.raises(ValueError, match="do not fit n_layers=14 x n_experts=2"):
        check_bundle(dataclasses.replace(bundle, config=config, experts=two))
    other = dataclasses.replace(runs["facts"], ffn_hidden_size=128)
    with pytest.raises(ValueError, match="expert|shape|another"):
        write_megatron_xlora(bundle, tmp_path / "out", tp=1, facts=other)
    assert not (tmp_path / "out").exists()
