"""Fine-tune LoRA adapters of a megatron-core GPT at tensor-parallel size N on a synthetic task.

    torchrun --nproc_per_node=2 scripts/finetune.py            # small random GPT, TP=2
    python scripts/finetune.py --tp 1                          # one plain process
    torchrun --nproc_per_node=N scripts/finetune.py --tp N --base HF_DIR --out DIR
    torchrun --nproc_per_node=2 scripts/finetune.py --xlora    # X-LoRA over 3 random experts

Saves the adapter as a megatron-lora checkpoint, or with --xlora a PEFT X-LoRA directory
(``--out``; the default location is overwritten, any other must not exist).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from megatron_lora.runtime.training import DEFAULT_OUT, DTYPES, FinetuneOptions, finetune  # noqa: E402


def parse_args(argv=None) -> FinetuneOptions:
    d = FinetuneOptions()
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tp", type=int, default=d.tp, metavar="N", help=f"tensor-parallel size (default {d.tp})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--r", type=int, default=d.r, help=f"LoRA rank (default {d.r})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    p.add_argument("--target-modules", nargs="+", default=d.target_modules, metavar="NAME",
                   help="HF projection names, Megatron module names or all-linear (default: the seven HF projections)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"adapter directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the model, adapters and data (default {d.seed})")
    p.add_argument("--base", metavar="HF_DIR", help="fine-tune this HF model instead of a small random GPT")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="base model dtype (default fp32; adapters stay fp32)")
    x = p.add_argument_group("X-LoRA")
    x.add_argument("--xlora", action="store_true",
                   help="train an X-LoRA classifier over LoRA experts and save a PEFT X-LoRA directory")
    x.add_argument("--xlora-experts", type=lambda v: v.split(","), metavar="DIR1,DIR2,...",
                   help="expert LoRA directories (PEFT or megatron-lora); default: 3 random experts made first")
    x.add_argument("--xlora-trainable-adapters", action="store_true",
                   help="train the experts too (use_trainable_adapters)")
    x.add_argument("--xlora-depth", type=int, default=d.xlora_depth, help=f"classifier depth (default {d.xlora_depth})")
    x.add_argument("--no-xlora-layerwise-scalings", dest="xlora_layerwise_scalings", action="store_false",
                   help="one scaling per expert for all layers (default: one per layer)")
    args = p.parse_args(argv)
    if args.target_modules == ["all-linear"]:
        args.target_modules = "all-linear"
    return FinetuneOptions(**vars(args))


if __name__ == "__main__":
    finetune(parse_args())
