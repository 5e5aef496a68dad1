"""``megatron-lora finetune`` (also ``scripts/finetune.py``): its flags (Megatron-LM's names, with
short aliases).

No flag may be a prefix of a torchrun option: torchrun parses abbreviations of its own
options anywhere on the command line (``--r`` would be ambiguous, ``--log`` would become
``--log-dir``), so the parser also refuses abbreviations of its own flags.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from megatron_lora.hf.layout import MOE_LAYOUTS
from megatron_lora.model.gpt import DTYPES
from megatron_lora.runtime.engine import LR_DECAY_STYLES
from megatron_lora.runtime.training import DEFAULT_SAVE, REAL_DEFAULTS, TINY_DEFAULTS, FinetuneOptions, finetune

USAGE = """torchrun --nproc_per_node=N scripts/finetune.py --base HF_DIR --data FILE.jsonl [options]
       torchrun --nproc_per_node=2 scripts/finetune.py --tiny   # synthetic smoke run
       python scripts/finetune.py --tiny                        # one plain process

DP = N / (TP x PP) (experts: N / (expert-TP x EP x PP)). Writes SAVE/iter_{k:07d}/ checkpoints and
SAVE/adapter/ (megatron-lora)."""


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="LoRA / X-LoRA fine-tuning at any TP x PP x DP",
                       description="LoRA / X-LoRA fine-tuning at any TP x PP x DP.", usage=USAGE, allow_abbrev=False)
    _add_arguments(p)
    p.set_defaults(func=_run_finetune)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneOptions(tiny=True)
    p.add_argument("--base", metavar="HF_DIR", help="the HF model to fine-tune (and its tokenizer); "
                   "with --tiny and no --base: a small random Llama")
    p.add_argument("--data", metavar="FILE.jsonl", help="training data in TRL's SFT formats")
    p.add_argument("--eval-data", metavar="FILE.jsonl", help="evaluation data (default: none, or --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, metavar="F", help="hold out this fraction of --data for evaluation")
    p.add_argument("--tiny", action="store_true", help="synthetic counting task (the fast smoke run)")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=d.tp, metavar="T",
                   help=f"tensor-parallel size (default {d.tp})")
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=d.pp, metavar="P",
                   help=f"pipeline-parallel size (default {d.pp})")
    p.add_argument("--expert-model-parallel-size", "--ep", dest="ep", type=int, default=d.ep, metavar="E",
                   help=f"mixture-of-experts bases: experts split over E ranks (default {d.ep})")
    p.add_argument("--expert-tensor-parallel-size", "--etp", dest="etp", type=int, metavar="T",
                   help="mixture-of-experts bases: each expert split over T ranks (default: the TP size)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="megatron-core's sequence parallelism (needs TP > 1; required for MoE bases at TP > 1)")
    p.add_argument("--moe-aux-loss-coeff", type=float, default=d.moe_aux_loss_coeff, metavar="C",
                   help="mixture-of-experts bases: megatron-core's load-balancing loss (aux_loss) with this "
                        f"coefficient, averaged over micro-batches and summed over layers (default {d.moe_aux_loss_coeff:g}: none)")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, metavar="M",
                   help=f"sequences per micro-batch (default {d.micro_batch_size})")
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size, metavar="G",
                   help=f"sequences per optimizer step: M x accumulation x DP (default {d.global_batch_size})")
    p.add_argument("--seq-length", type=int, metavar="S",
                   help=f"tokens per sequence (default {REAL_DEFAULTS['seq_length']}; "
                        f"{TINY_DEFAULTS['seq_length']} with --tiny)")
    p.add_argument("--packing", action="store_true", help="pack short examples into one sequence (default off)")
    p.add_argument("--train-iters", "--steps", dest="train_iters", type=int, default=d.train_iters, metavar="K",
                   help=f"total optimizer steps, counting those before --load (default {d.train_iters})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {REAL_DEFAULTS['lr']:g}; "
                   f"{TINY_DEFAULTS['lr']:g} with --tiny)")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help=f"learning rate after decay (default {d.min_lr:g})")
    p.add_argument("--lr-warmup-iters", type=int, default=d.lr_warmup_iters, metavar="W",
                   help=f"linear warmup steps from 0 (default {d.lr_warmup_iters})")
    p.add_argument("--lr-decay-iters", type=int, metavar="D", help="decay steps (default: --train-iters)")
    p.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=d.lr_decay_style,
                   help=f"(default {d.lr_decay_style})")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, metavar="C",
                   help=f"gradient-norm clipping, 0 for none (default {d.clip_grad:g})")
    p.add_argument("--eval-interval", type=int, default=d.eval_interval, metavar="I",
                   help=f"evaluate every I steps, besides at the start and the end (default {d.eval_interval})")
    p.add_argument("--eval-iters", type=int, metavar="J", help="evaluation batches (default: the whole evaluation set)")
    p.add_argument("--lora-r", type=int, default=d.lora_r, metavar="R", help=f"LoRA rank (default {d.lora_r})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, metavar="A",
                   help=f"LoRA alpha (default {d.lora_alpha:g})")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, metavar="D",
                   help=f"dropout on the LoRA input (default {d.lora_dropout:g})")
    p.add_argument("--target-modules", nargs="+", default=d.target_modules, metavar="NAME",
                   help="HF projection names, Megatron module names or all-linear (default: the seven HF projections)")
    p.add_argument("--use-dora", action="store_true",
                   help="DoRA (PEFT's use_dora): also train a magnitude per output row of each adapted module")
    p.add_argument("--ensure-weight-tying", action="store_true",
                   help="PEFT's ensure_weight_tying: on a base with tied embeddings, lm_head's adapter is "
                        "embed_tokens' (transposed) when either is targeted")
    p.add_argument("--save", default=DEFAULT_SAVE, metavar="DIR",
                   help=f"checkpoints and the final adapter (default {DEFAULT_SAVE}); an existing one must "
                        "hold our checkpoints")
    p.add_argument("--save-interval", type=int, metavar="I", help="checkpoint every I steps (default: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="K",
                   help=f"keep the newest K checkpoints (default {d.keep_checkpoints})")
    p.add_argument("--load", metavar="DIR", help="resume from the newest checkpoint in DIR (may equal --save)")
    p.add_argument("--log-jsonl", metavar="FILE", help="per-step and evaluation records, JSON lines (rank 0)")
    p.add_argument("--export-peft", metavar="DIR", help="also write the final adapter as a PEFT directory")
    p.add_argument("--moe-layout", choices=MOE_LAYOUTS, default=d.moe_layout,
                   help="--export-peft of a mixture of experts' expert and router adapters: 'fused' "
                        "(transformers 5's fused experts through target_parameters; needs --lora-dropout 0) or "
                        f"'per-expert' (transformers 4's modules), as convert writes them (default {d.moe_layout})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the adapters and the data order (default {d.seed})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype,
                   help=f"base model dtype; adapters stay fp32 (default {d.dtype})")
    p.add_argument("--show-answers", type=int, default=d.show_answers, metavar="N",
                   help=f"print greedy answers to the first N prompts of --eval-data before and after training "
                        f"(PP=1; default {d.show_answers}, 0: none)")
    x = p.add_argument_group("X-LoRA")
    x.add_argument("--xlora", action="store_true",
                   help="train an X-LoRA classifier over LoRA experts (PP must be 1)")
    x.add_argument("--xlora-experts", type=lambda v: v.split(","), metavar="DIR1,DIR2,...",
                   help="expert LoRA directories (PEFT or megatron-lora); default: 3 random experts made first")
    x.add_argument("--xlora-trainable-adapters", action="store_true", help="train the experts too")
    x.add_argument("--xlora-depth", type=int, default=d.xlora_depth, help=f"classifier depth (default {d.xlora_depth})")
    x.add_argument("--no-xlora-layerwise-scalings", dest="xlora_layerwise_scalings", action="store_false",
                   help="one scaling per expert for all layers (default: one per layer)")


def _options(args: argparse.Namespace) -> FinetuneOptions:
    """FinetuneOptions from parsed flags; raises ValueError for inconsistent ones."""
    values = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if values["target_modules"] == ["all-linear"]:
        values["target_modules"] = "all-linear"
    return FinetuneOptions(**values)


def parse_options(argv: Sequence[str]) -> FinetuneOptions:
    """FinetuneOptions from ``megatron-lora finetune`` flags."""
    from megatron_lora.cli.main import build_parser

    return _options(build_parser().parse_args(["finetune", *argv]))


def _run_finetune(args: argparse.Namespace) -> int:
    finetune(_options(args))
    return 0
