"""Whole-model LoRA training step on one GPU: ours vs its frozen base vs HF + PEFT; and the layer table.

Model (bf16 weights): 8 layers, hidden 2048, 16 heads / 4 key-value groups, ffn 5632
(SwiGLU), vocab 32000; LoRA r=16, alpha 32 on all seven projections; AdamW on the LoRA
factors. One step = forward, fp32 cross entropy on the logits, backward, optimizer step.

Cases, built side by side on the GPU and timed in one interleaved loop (each repetition
runs every case once; the table shows medians of CUDA-event times):

* ``ours``: ``build_gpt`` (local spec, SDPA core attention, megatron-core's TE-free
  fusions) + ``apply_lora`` (fp32 A and B; the compute precision is the package default);
* ``ours frozen base``: the same model without LoRA; all weights frozen, the embedding
  output requires grad, so backward computes every activation gradient and no weight one;
* ``PEFT bf16``: HF ``LlamaForCausalLM`` (SDPA attention) + PEFT LoRA with bf16 adapters
  (``autocast_adapter_dtype=False``, PEFT's fast setting); ``PEFT fp32``: PEFT's default
  (fp32 adapters, activations cast to fp32); ``HF frozen base`` like ours.

Peak GB is per case: its own parameters, gradients and optimizer state plus the peak
transient memory of its step (the other cases' resident tensors subtracted). Model TFLOP/s
counts the same FLOPs for every case: 4 x linear parameters x tokens (forward and input
gradient; frozen weights need no weight gradient), 6 x b s^2 x hidden x layers for causal
attention (forward + 2x backward, half the square), and 6 x tokens x r x (in + out) per
LoRA linear (three small GEMM pairs); the frozen bases without the LoRA term.

The layer table: 8192 tokens, bf16, r=16, a LoRA layer's forward + backward (input and
LoRA gradients) over its frozen base layer, ours (megatron-core Column/RowParallelLinear
made LoRA layers) vs PEFT (``nn.Linear``, bf16 and fp32 adapters) over its ``nn.Linear``.

    python benchmarks/gpu_step.py                 # both tables (about two minutes on an H100)
    python benchmarks/gpu_step.py --quick         # a small model and shapes (smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lora.parallel.device import device  # noqa: E402

R, ALPHA = 16, 32.0
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = dict(layers=8, hidden=2048, heads=16, groups=4, ffn=5632, vocab=32000)
QUICK_MODEL = dict(layers=2, hidden=256, heads=4, groups=2, ffn=704, vocab=1024)
SHAPES = [(4, 2048), (2, 8192)]
QUICK_SHAPES = [(2, 256)]
LAYER_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)]
QUICK_LAYER_SHAPES = [(1024, 512, 512)]


@dataclass
class Case:
    name: str
    step: Callable[[torch.Tensor], None]  # one training step on ids [b, s + 1]
    resident: Callable[[], int]  # bytes of its parameters, gradients and optimizer state
    lora: bool
    times: list[float] = field(default_factory=list)
    peak: float = 0.0


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _resident(model: torch.nn.Module, opt: Optional[torch.optim.Optimizer]) -> Callable[[], int]:
    def count() -> int:
        params = list(model.parameters())
        state = [] if opt is None else [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return _bytes(params) + _bytes(p.grad for p in params) + _bytes(state)
    return count


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _training_step(forward: Callable, opt: Optional[torch.optim.Optimizer]) -> Callable[[torch.Tensor], None]:
    def step(ids: torch.Tensor) -> None:
        loss = _loss(forward(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def _input_requires_grad(module: torch.nn.Module) -> None:
    # A frozen model's backward stops at once; from its embedding output it runs the whole
    # network's activation gradients, which a LoRA step needs too.
    module.register_forward_hook(lambda m, args, out: out.requires_grad_())


def ours(m: dict, frozen: bool) -> Case:
    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for

    cfg = gpt_config(m["layers"], m["hidden"], m["heads"], m["ffn"], num_query_groups=m["groups"],
                     params_dtype=torch.bfloat16, layernorm_epsilon=1e-5)
    model = build_gpt(cfg, m["vocab"], max_sequence_length=max(s for _, s in SHAPES) + 1)
    opt = None
    if frozen:
        model.requires_grad_(False)
        _input_requires_grad(model.embedding)
    else:
        model = apply_lora(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=SEVEN))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = _training_step(lambda ids: model(ids, positions_for(ids), None), opt)
    return Case("ours frozen base" if frozen else "ours", step, _resident(model, opt), not frozen)


def hf(m: dict, adapters: Optional[str]) -> Case:
    """HF Llama with SDPA attention; PEFT LoRA with ``adapters`` "bf16" / "fp32" (None: frozen base)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["ffn"],
                      num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                      num_key_value_heads=m["groups"], max_position_embeddings=max(s for _, s in SHAPES) + 1,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    with device():
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    opt = None
    if adapters is None:
        model.requires_grad_(False)
        _input_requires_grad(model.model.embed_tokens)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=SEVEN),
                               autocast_adapter_dtype=adapters == "fp32")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    name = "HF frozen base" if adapters is None else f"PEFT {adapters} adapters"
    return Case(name, _training_step(lambda ids: model(input_ids=ids).logits, opt), _resident(model, opt),
                adapters is not None)


def step_flops(m: dict, b: int, s: int, lora: bool) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    h, f, L = m["hidden"], m["ffn"], m["layers"]
    kv = h // m["heads"] * m["groups"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # (in, out) per layer
    tokens = b * s
    weights = L * sum(i * o for i, o in linears) + h * m["vocab"]
    flops = 4 * weights * tokens + 6 * b * s * s * h * L
    if lora:
        flops += 6 * tokens * R * L * sum(i + o for i, o in linears)
    return float(flops)


def time_steps(cases: list[Case], ids: torch.Tensor, reps: int, warmup: int) -> None:
    """Interleaved repetitions, CUDA events; then one step per case for its peak memory."""
    for c in cases:
        c.times = []
    for rep in range(warmup + reps):
        events = []
        for c in cases:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            c.step(ids)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        if rep >= warmup:
            for c, (start, end) in zip(cases, events):
                c.times.append(start.elapsed_time(end))
    for c in cases:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        c.step(ids)
        torch.cuda.synchronize()
        c.peak = (torch.cuda.max_memory_allocated() - before + c.resident()) / 1e9


def layer_table(shapes, reps: int, warmup: int) -> list[dict]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from peft import LoraConfig, get_peft_model

    from megatron_lora.model.gpt import gpt_config
    from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, add_lora_support

    rows = []
    for tokens, d_in, d_out in shapes:
        cfg = gpt_config(1, d_in, 8, d_out, params_dtype=torch.bfloat16)
        init = torch.nn.init.xavier_uniform_

        def megatron(kind: str, lora: bool):
            if kind == "column":
                layer = ColumnParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=False, gather_output=False)
            else:
                layer = RowParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=False,
                                          input_is_parallel=True, skip_bias_add=False)
            layer.weight.requires_grad_(False)
            if lora:
                add_lora_support(layer).add_adapter("default", AdapterSpec(
                    (Segment(name="x", r=R, scaling=ALPHA / R, width=layer.weight.shape[0]),), init=False))
            return (lambda x: layer(x)[0]), layer

        def peft(adapters: Optional[str]):
            with device():
                seq = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)).to(torch.bfloat16)
            seq.requires_grad_(False)
            if adapters is not None:
                seq = get_peft_model(seq, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"],
                                                     init_lora_weights=False), autocast_adapter_dtype=adapters == "fp32")
            return seq, seq

        x = torch.randn(tokens, 1, d_in, device=device(), dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, 1, d_out, device=device(), dtype=torch.bfloat16)
        fns = {"column base": megatron("column", False), "column ours": megatron("column", True),
               "row base": megatron("row", False), "row ours": megatron("row", True),
               "PEFT base": peft(None), "PEFT bf16": peft("bf16"), "PEFT fp32": peft("fp32")}
        times = {k: [] for k in fns}
        for rep in range(warmup + reps):
            events = {}
            for name, (fn, module) in fns.items():
                x.grad = None
                for param in module.parameters():
                    param.grad = None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x).backward(grad)
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize()
            if rep >= warmup:
                for name, (start, end) in events.items():
                    times[name].append(start.elapsed_time(end))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(shape=f"{tokens}x{d_in}->{d_out}", **med))
    return rows


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_step.py needs a CUDA GPU (torch.cuda.is_available() is False)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model and shapes (smoke run)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    p.add_argument("--skip-fp32-peft", action="store_true", help="leave out PEFT's default (fp32 adapters)")
    p.add_argument("--json-out", metavar="F.json", help="also write the figures as JSON")
    args = p.parse_args(argv)
    require_cuda()
    from megatron_lora import init_distributed

    init_distributed(1)
    m = QUICK_MODEL if args.quick else MODEL
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 weights, LoRA r={R} on {len(SEVEN)} "
          f"projections, AdamW; medians of {args.reps} interleaved repetitions after {args.warmup} warm-up; "
          f"model {m}", flush=True)
    cases = [ours(m, False), ours(m, True), hf(m, "bf16"), hf(m, None)]
    if not args.skip_fp32_peft:
        cases.append(hf(m, "fp32"))
    steps = []
    head = f"{'b x s':<10}{'case':<22}{'step ms':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'peak GB':>9}{'/ PEFT bf16':>13}"
    print(head + "\n" + "-" * len(head))
    for b, s in shapes:
        ids = torch.randint(0, m["vocab"], (b, s + 1), device=device())
        time_steps(cases, ids, args.reps, args.warmup)
        ref = statistics.median(next(c for c in cases if c.name == "PEFT bf16 adapters").times)
        for c in cases:
            ms = statistics.median(c.times)
            row = dict(shape=f"{b}x{s}", case=c.name, ms=ms, tokens_per_s=b * s / ms * 1e3,
                       tflops=step_flops(m, b, s, c.lora) / ms / 1e9, peak_gb=c.peak, vs_peft_bf16=ms / ref)
            steps.append(row)
            print(f"{row['shape']:<10}{c.name:<22}{ms:9.1f}{row['tokens_per_s']:11.0f}{row['tflops']:9.1f}"
                  f"{c.peak:9.2f}{row['vs_peft_bf16']:13.2f}", flush=True)
    del cases
    torch.cuda.empty_cache()
    layers = layer_table(QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES, args.reps, args.warmup)
    head = f"{'tokens x in->out':<22}{'column':>8}{'row':>8}{'PEFT bf16':>11}{'PEFT fp32':>11}   (LoRA layer / its base)"
    print("\n" + head + "\n" + "-" * len(head))
    for r in layers:
        print(f"{r['shape']:<22}{r['column ours'] / r['column base']:8.3f}{r['row ours'] / r['row base']:8.3f}"
              f"{r['PEFT bf16'] / r['PEFT base']:11.3f}{r['PEFT fp32'] / r['PEFT base']:11.3f}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "steps": steps,
                                                   "layers": layers}, indent=2) + "\n")


if __name__ == "__main__":
    main()
