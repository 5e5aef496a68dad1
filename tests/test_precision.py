"""The one precision rule of LoRA layers (``parallel.lora_layers.LoraComputeDtype``).

- "base" mode on a bf16 base (TP=2, fp32 adapters): no activation is ever cast to fp32, the
  factors' gradients arrive in fp32, and outputs and gradients stay within the stated
  tolerance of the fp32 oracle (the same bf16 values, fp32 math): FAST_TOL.
- "fp32" mode (PEFT's rule) casts the activations instead; on an fp32 base with bf16 and
  fp16 adapter files it equals HF + PEFT (which upcasts half-precision adapter weights to
  fp32) to 1e-5 of the logit scale, through ``convert``'s ``verify`` and through
  ``generate_from_dirs`` at TP=2.
- X-LoRA's mixing follows the same rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist import run_ranks
from oracle import TOL
from test_lora_layers import IN, SCALE, _full, _layers, _rel

#: Base mode on a bf16 base vs the fp32 oracle: max |diff| / max |reference| of outputs and
#: of every gradient (bf16 rounds to 2^-9 relative; sums of a few rounded terms).
FAST_TOL = 2e-2
S, B = 8, 2
TOKENS = S * B
IDS = "3,17,42,99,5,64,127,8,0,31"


class _FloatCasts(TorchDispatchMode):
    """Counts casts of activations ([TOKENS, ...] tensors) to fp32."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0]
        if (func is torch.ops.aten._to_copy.default and out.dtype == torch.float32 and src.dtype != torch.float32
                and out.dim() == 2 and out.shape[0] == TOKENS):
            self.count += 1
        return out


def _pair_run(world, mode):
    """Column then row layer on a bf16 base: errors vs the fp32 oracle, fp32 activation casts."""
    from megatron_lora.parallel.lora_layers import LoraComputeDtype

    col, row = _layers(world, False, dtype=torch.bfloat16)
    for layer in (col, row):
        layer.lora_compute_dtype = LoraComputeDtype(mode)
    x32 = torch.randn(S, B, IN, generator=torch.Generator().manual_seed(4)).bfloat16().float()
    g = torch.randn(S, B, IN, generator=torch.Generator().manual_seed(5))
    x = x32.bfloat16().requires_grad_(True)
    with _FloatCasts() as casts:
        h, _ = col(x)
        y, _ = row(h)
        (y.float() * g).sum().backward()

    A1, B1 = col.lora_A["default"]["x"], col.lora_B["default"]["x"]
    A2, B2 = row.lora_A["default"]["x"], row.lora_B["default"]["x"]
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in
           dict(A1=A1, B1=_full(B1, 0), A2=_full(A2, 1), B2=B2).items()}
    W1, b1 = _full(col.weight, 0).float(), _full(col.bias, 0).float()
    W2, b2 = _full(row.weight, 1).float(), row.bias.detach().float()
    xr = x32.clone().requires_grad_(True)
    hr = F.linear(xr, W1, b1) + SCALE * F.linear(F.linear(xr, ref["A1"]), ref["B1"])
    yr = F.linear(hr, W2, b2) + SCALE * F.linear(F.linear(hr, ref["A2"]), ref["B2"])
    (yr * g).sum().backward()
    return {
        "casts": casts.count,
        "grad_dtypes": {str(p.grad.dtype) for p in (A1, B1, A2, B2)},
        "y": _rel(y.detach().float(), yr.detach()),
        "grad_x": _rel(x.grad.float(), xr.grad),
        "grad_A1": _rel(A1.grad, ref["A1"].grad),
        "grad_B1": _rel(_full(B1.grad, 0), ref["B1"].grad),
        "grad_A2": _rel(_full(A2.grad, 1), ref["A2"].grad),
        "grad_B2": _rel(B2.grad, ref["B2"].grad),
    }


class _FixedScalings:
    """X-LoRA scalings source with one fixed [tokens, n_experts] tensor."""

    def __init__(self, scalings):
        self.scalings = scalings

    def for_layer(self, index):
        return self.scalings


def _xlora_run(world, dtype, mode):
    """A column layer mixing two experts vs the fp32 math of the mixture."""
    from megatron_lora.parallel.lora_layers import AdapterSpec, LoraComputeDtype, Segment
    from megatron_lora.parallel.xlora_mixing import XLoraMixing

    col, _ = _layers(world, False, dtype=dtype)
    col.add_adapter("e1", AdapterSpec((Segment(name="x", r=3, scaling=0.5, width=col.weight.shape[0]),), init=False))
    col.lora_compute_dtype = LoraComputeDtype(mode)
    scalings = torch.rand(TOKENS, 2, generator=torch.Generator().manual_seed(7)).to(dtype)
    col.active_adapters = []
    col.extra_terms.append(XLoraMixing(col, _FixedScalings(scalings), ["default", "e1"], {"x": 0}))
    x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(8)).to(dtype)
    with _FloatCasts() as casts:
        y = col(x)[0]
    y = _full(y.detach(), 1).float()
    xf, s = x.float(), scalings.float()
    ref = F.linear(xf, _full(col.weight, 0).float(), _full(col.bias, 0).float())
    for i, (name, scaling) in enumerate((("default", SCALE), ("e1", 0.5))):
        a, b = col.lora_A[name]["x"].detach(), _full(col.lora_B[name]["x"], 0)
        ref = ref + s[:, i : i + 1] * scaling * F.linear(F.linear(xf, a), b)
    return {"err": _rel(y, ref), "casts": casts.count}


def _layer_checks(rank, world):
    from megatron_lora import init_distributed

    init_distributed(world, seed=3)
    return {
        "pair": {mode: _pair_run(world, mode) for mode in ("base", "fp32")},
        "xlora": {(str(dtype), mode): _xlora_run(world, dtype, mode)
                  for dtype in (torch.float32, torch.bfloat16) for mode in ("base", "fp32")},
    }


@pytest.fixture(scope="module")
def layer_results():
    return run_ranks(_layer_checks, 2)


def test_base_mode_keeps_activations_in_bf16_within_tolerance(layer_results):
    for r in layer_results:
        fast = r["pair"]["base"]
        assert fast["casts"] == 0
        assert fast["grad_dtypes"] == {"torch.float32"}
        for key in ("y", "grad_x", "grad_A1", "grad_B1", "grad_A2", "grad_B2"):
            assert fast[key] <= FAST_TOL, (key, fast[key])
        # PEFT's rule casts the activations to fp32 (the cost the base mode avoids).
        assert r["pair"]["fp32"]["casts"] > 0
        assert r["pair"]["fp32"]["grad_dtypes"] == {"torch.float32"}


def test_xlora_mixing_follows_the_rule(layer_results):
    for r in layer_results:
        x = r["xlora"]
        assert x[("torch.float32", "base")]["err"] <= TOL and x[("torch.float32", "fp32")]["err"] <= TOL
        assert x[("torch.bfloat16", "base")]["casts"] == 0
        assert x[("torch.bfloat16", "base")]["err"] <= FAST_TOL
        assert x[("torch.bfloat16", "fp32")]["casts"] > 0
        assert x[("torch.bfloat16", "fp32")]["err"] <= FAST_TOL


# -- PEFT's rule against HF + PEFT with half-precision adapter files ---------------------------


@pytest.fixture(scope="module")
def half_adapters(tmp_path_factory):
    """A tiny HF Llama and PEFT adapters whose weights are saved in bf16 and in fp16."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, rms_norm_eps=1e-6)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        torch.manual_seed(1)
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(dtype)
        pm.save_pretrained(root / name)
        saved = load_file(str(root / name / "adapter_model.safetensors"))
        assert {t.dtype for t in saved.values()} == {dtype}
        out[name] = root / name
    return root / "base", out


def _hf_peft_logits(base, adapter) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # PEFT upcasts
    with torch.no_grad():
        return model(input_ids=torch.tensor([[int(t) for t in IDS.split(",")]])).logits[0]


def _generate_logits(rank, world, base, adapters, outdir):
    from megatron_lora.cli.generate import generate_from_dirs

    for name, adapter in adapters.items():
        generate_from_dirs(base, input_ids=IDS, adapter=adapter, tp=world, max_new_tokens=1,
                           logits_out=f"{outdir}/{name}.safetensors")


def test_peft_rule_equals_hf_peft_with_half_adapters(half_adapters, tmp_path):
    from safetensors.torch import load_file

    from megatron_lora.cli.convert import verify
    from megatron_lora.formats.convert import base_facts, convert

    base, adapters = half_adapters
    run_ranks(_generate_logits, 2, str(base), {k: str(v) for k, v in adapters.items()}, str(tmp_path))
    for name, adapter in adapters.items():
        theirs = _hf_peft_logits(base, adapter)
        ours = load_file(str(tmp_path / f"{name}.safetensors"))["logits"].float()
        assert (ours - theirs).abs().max().item() <= TOL * theirs.abs().max().item(), name
        convert(adapter, tmp_path / f"{name}_megatron", "megatron", facts=base_facts(base), tp=1, progress=False)
        diff, scale = verify(base, adapter, tmp_path / f"{name}_megatron")
        assert diff <= TOL * scale, (name, diff, scale)
