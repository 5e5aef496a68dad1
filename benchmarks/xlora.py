"""X-LoRA time over single-LoRA time, ours next to PEFT's, in one run.

Model: Llama shapes hidden 512, ffn 1408, 4 layers, 8 heads / 4 query groups, vocab 1024,
one prompt of 512 tokens; 4 experts of r=16 on all seven projections; classifier depth 1,
scaling_pass_value 0; eval mode, fp32, 2 threads, TP=1 (one process).

* ours: a megatron-core GPTModel (``load_hf_base``) with ``apply_xlora`` (experts stacked:
  two GEMMs of rank 4 x 16 per projection) vs the same GPTModel with one expert as a LoRA;
* PEFT 0.21.2: ``XLoraModel`` vs ``PeftModel`` with one expert, on the HF model.

Timed: the forward (no_grad), a training step (forward + backward of the logits' sum;
X-LoRA: classifier trainable, experts frozen; LoRA: the adapter trainable), and greedy decoding of ``--decode-tokens`` new tokens after the
prompt: ours with the two KV caches (scaling pass and scaled pass, one token each per step),
PEFT recomputing the whole sequence each step (its X-LoRA refuses ``use_cache``); reported
per new token, the prompt's own pass subtracted. Each repetition
times the four models one after the other (so slow phases of a shared machine hit all of
them); the table shows medians and the ratios.

    python benchmarks/xlora.py            # full run
    python benchmarks/xlora.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=1024)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_dirs(root: Path, n_experts: int, r: int, shapes: dict) -> tuple[str, list[str]]:
    """An HF Llama directory and ``n_experts`` PEFT LoRA directories (non-zero B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shapes, rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=False,
                      use_cache=False)
    base = LlamaForCausalLM(cfg).float().eval()
    base.save_pretrained(root / "base")
    experts = []
    for i in range(n_experts):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=SEVEN,
                                                            init_lora_weights=False))
        pm.save_pretrained(root / f"expert{i}")
        experts.append(str(root / f"expert{i}"))
    return str(root / "base"), experts


def build(base_dir: str, experts: list[str]) -> dict:
    """The four models, each a callable running one forward on ``ids``."""
    from peft import PeftModel, XLoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from megatron_lora.model.gpt import positions_for
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.adapters import load_adapter
    from megatron_lora.model.xlora import XLoraConfig as OurXLoraConfig
    from megatron_lora.model.xlora import apply_xlora

    single, _ = load_hf_base(base_dir)
    load_adapter(single, experts[0], "default")
    mixed, _ = load_hf_base(base_dir)
    xmodel = apply_xlora(mixed, OurXLoraConfig(xlora_depth=1), {str(i): d for i, d in enumerate(experts)}).eval()
    hf = LlamaForCausalLM.from_pretrained(base_dir).float().eval()
    peft_single = PeftModel.from_pretrained(hf, experts[0], is_trainable=True).eval()
    hf2 = LlamaForCausalLM.from_pretrained(base_dir).float().eval()
    peft_x = get_peft_model(hf2, XLoraConfig(task_type="CAUSAL_LM", hidden_size=hf2.config.hidden_size,
                                             adapters={str(i): d for i, d in enumerate(experts)}, xlora_depth=1)).eval()
    runs = {
        "ours LoRA": lambda ids: single(ids, positions_for(ids), None),
        "ours X-LoRA": lambda ids: xmodel(ids, positions_for(ids), None),
        "PEFT LoRA": lambda ids: peft_single(input_ids=ids).logits,
        "PEFT X-LoRA": lambda ids: peft_x(input_ids=ids).logits,
    }
    return runs, xmodel, peft_x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    from megatron_lora import init_distributed

    init_distributed(1)
    shapes, seq, reps = dict(SHAPES), 512, args.reps
    if args.quick:
        shapes.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=256)
        seq, reps, args.decode_tokens = 64, 2, 8
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, experts = make_dirs(Path(tmp), 4, 16, shapes)
        models, xmodel, peft_x = build(base_dir, experts)
    ids = torch.randint(0, shapes["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
    print(f"prompt {seq} tokens, 4 experts r=16 on 7 projections, depth 1, fp32, 2 threads, {reps} reps (median)")
    for label, step in (("forward", forward), ("training step", train_step)):
        med = time_interleaved(models, step, ids, reps)
        for name, t in med.items():
            print(f"  {label:13s} {name:12s} {t * 1e3:8.1f} ms")
        print(f"X-LoRA / LoRA {label}: ours {med['ours X-LoRA'] / med['ours LoRA']:.2f}x, "
              f"PEFT {med['PEFT X-LoRA'] / med['PEFT LoRA']:.2f}x")
    ours, peft = decode_per_token(xmodel, peft_x, ids, args.decode_tokens)
    print(f"X-LoRA decode per new token ({args.decode_tokens} tokens): ours (two KV caches) {ours * 1e3:.1f} ms, "
          f"PEFT (recomputation) {peft * 1e3:.1f} ms, PEFT / ours {peft / ours:.1f}x")


def decode_per_token(xmodel, peft_x, ids, n: int) -> tuple[float, float]:
    """Seconds per new token after the prompt: (ours, PEFT), greedy, no early stop."""
    from megatron_lora.runtime.generation import generate

    def ours(k):
        with torch.no_grad():
            generate(xmodel, ids[0].tolist(), k)

    def peft(k):
        with torch.no_grad():
            peft_x.generate(input_ids=ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=False)

    result = []
    for run in (ours, peft):
        t = []
        for k in (1, n):
            t0 = time.perf_counter()
            run(k)
            t.append(time.perf_counter() - t0)
        result.append((t[1] - t[0]) / (n - 1))
    return result[0], result[1]


def forward(fn, ids) -> None:
    with torch.no_grad():
        fn(ids)


def train_step(fn, ids) -> None:
    fn(ids).sum().backward()


def time_interleaved(models: dict, step, ids, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    for fn in models.values():  # warm-up
        step(fn, ids)
    for _ in range(reps):
        for name, fn in models.items():
            t0 = time.perf_counter()
            step(fn, ids)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
