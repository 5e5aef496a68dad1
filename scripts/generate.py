"""Generate text with an HF base model (and optionally a LoRA or X-LoRA adapter) at tensor-parallel size N.

    torchrun --nproc_per_node=N scripts/generate.py --base HF_DIR [--adapter DIR] --tp N \\
        (--prompt TEXT | --input-ids 1,2,3) [--max-new-tokens K] [--temperature T] [--top-p P]
        [--seed S] [--dtype fp32] [--logits-out F.safetensors] [--tokens-out F.json]
        [--scalings-out F.safetensors] [--xlora-scalings-once]

An X-LoRA --adapter (PEFT X-LoRA, original xlora package, or megatron-lora X-LoRA
checkpoint) is detected; its scaling pass and scaled pass each keep a KV cache.

Also runs as a plain ``python scripts/generate.py ... --tp 1``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from megatron_lora.cli import run_entry  # noqa: E402
from megatron_lora.runtime.generation import generate_from_dirs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--base", required=True, metavar="HF_DIR", help="HF model directory (config.json + safetensors)")
    p.add_argument("--adapter", metavar="DIR", help="LoRA or X-LoRA directory: PEFT, xlora package or megatron-lora checkpoint")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size (default 1)")
    p.add_argument("--expert-model-parallel-size", type=int, default=1, metavar="N",
                   help="mixture-of-experts bases: ranks the experts are split over (default 1)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="text, tokenized by the HF tokenizer in --base")
    prompt.add_argument("--input-ids", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="K", help="default 32")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random, shared by all ranks)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="default fp32")
    p.add_argument("--logits-out", metavar="F.safetensors", help="write the prompt's logits [seq, vocab] (fp32)")
    p.add_argument("--tokens-out", metavar="F.json", help="write the generated ids as a JSON list")
    p.add_argument("--scalings-out", metavar="F.safetensors",
                   help="X-LoRA: write the prompt's scalings [seq, n_layers, n_experts] (key scalings, fp32; "
                   "after softmax, before top-k) and its input_ids")
    p.add_argument("--xlora-scalings-once", action="store_true",
                   help="X-LoRA: reuse the last prompt token's scalings for every new token (no scaling pass "
                   "while decoding)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Input errors end in one line on rank 0 and exit status 1 (``cli.run_entry``)."""
    args = parse_args(argv)

    def run() -> int:
        generate_from_dirs(**vars(args))
        return 0

    return run_entry(run, "generate.py")


if __name__ == "__main__":
    sys.exit(main())
