"""``megatron-lora generate`` (also ``scripts/generate.py``): text from an HF base, with a LoRA or
X-LoRA adapter, at tensor-parallel size N.

    torchrun --nproc_per_node=N -m megatron_lora.cli generate --base HF_DIR [--adapter DIR] --tp N \\
        (--prompt TEXT | --input-ids 1,2,3) [--max-new-tokens K] [--temperature T] [--top-p P]
        [--seed S] [--dtype fp32] [--logits-out F.safetensors] [--tokens-out F.json]
        [--scalings-out F.safetensors] [--xlora-scalings-once]

An X-LoRA --adapter (PEFT X-LoRA, original xlora package, or megatron-lora X-LoRA checkpoint) is
detected; its scaling pass and scaled pass each keep a KV cache. LoRA runs in PEFT's precision
(fp32 LoRA math), so the output equals HF + PEFT's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with an HF base and an optional LoRA / X-LoRA adapter",
                       description=__doc__.strip().splitlines()[0])
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
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    generate_from_dirs(**options)
    return 0


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _tokenizer(base: Path, required: bool):
    if not any((base / f).is_file() for f in _TOKENIZER_FILES):
        if required:
            raise FileNotFoundError(f"{base}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) for --prompt")
        return None
    from transformers import AutoTokenizer  # only the text front end needs transformers

    return AutoTokenizer.from_pretrained(str(base))


def generate_from_dirs(
    base: str,
    prompt: Optional[str] = None,
    input_ids: Optional[str] = None,
    adapter: Optional[str] = None,
    tp: int = 1,
    expert_model_parallel_size: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    dtype: str = "fp32",
    logits_out: Optional[str] = None,
    tokens_out: Optional[str] = None,
    scalings_out: Optional[str] = None,
    xlora_scalings_once: bool = False,
) -> list[int]:
    """What ``megatron-lora generate`` (``scripts/generate.py``) does: import the HF base at TP ``tp``
    (a mixture of experts split over ``expert_model_parallel_size`` ranks) (+ a LoRA or
    X-LoRA adapter, detected), run the prompt, generate; rank 0 prints the text and writes
    the optional output files.

    ``scalings_out`` (X-LoRA): the prompt's scalings as PEFT logs them (after softmax,
    before top-k), key ``scalings`` [seq, n_layers, n_experts] fp32, and the prompt's
    ``input_ids`` [seq].
    """
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_lora.errors import check_positive_int
    from megatron_lora.formats.detect import detect
    from megatron_lora.formats.outputs import atomic_file, check_flag_output
    from megatron_lora.hf.importer import eos_token_ids, hf_model_facts, load_hf_base, read_hf_config
    from megatron_lora.model.adapters import load_adapter
    from megatron_lora.model.gpt import DTYPES
    from megatron_lora.model.xlora import load_xlora
    from megatron_lora.parallel.lora_layers import LoraComputeDtype, configure_lora_layers
    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.runtime.generation import forward_logits, generate

    base_dir = Path(base)
    vocab = hf_model_facts(read_hf_config(base_dir)).vocab_size
    tokenizer = _tokenizer(base_dir, required=prompt is not None)
    if prompt is not None:
        ids = tokenizer(prompt)["input_ids"]
    else:
        try:
            ids = [int(t) for t in input_ids.split(",")]
        except ValueError as e:
            raise ValueError(f"--input-ids must be comma-separated integers, got {input_ids!r}") from e
    if not ids or max(ids) >= vocab or min(ids) < 0:
        raise ValueError(f"prompt ids must be in [0, {vocab}), got {ids}")
    check_positive_int("--tp", tp)
    check_positive_int("--expert-model-parallel-size", expert_model_parallel_size)
    for flag, out in (("--logits-out", logits_out), ("--tokens-out", tokens_out), ("--scalings-out", scalings_out)):
        if out is not None:
            check_flag_output(flag, out)
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter {adapter} does not exist (or is not a directory)")
    xlora = adapter is not None and detect(adapter).is_xlora
    if (scalings_out or xlora_scalings_once) and not xlora:
        raise ValueError(f"--scalings-out and --xlora-scalings-once need an X-LoRA --adapter, got {adapter!r}")
    init_distributed(tp, expert_model_parallel_size=expert_model_parallel_size)
    model, _ = load_hf_base(base_dir, DTYPES[dtype])
    if xlora:
        model = load_xlora(model, adapter).eval()
    elif adapter is not None:
        load_adapter(model, adapter, adapter_name="default")
    configure_lora_layers(model, compute_dtype=LoraComputeDtype.FP32)  # equal to HF + PEFT
    logits = scalings = None
    if logits_out or scalings_out:
        logits = forward_logits(model, torch.tensor([ids]))[0]
        scalings = model.get_latest_scalings()[0].float() if xlora else None
    new = generate(model, ids, max_new_tokens, eos_token_ids(base_dir), temperature, top_p, seed,
                   xlora_scalings_once=xlora_scalings_once)
    if dist.get_rank() == 0:
        if logits_out:
            with atomic_file(logits_out) as tmp:
                save_file({"logits": logits.contiguous()}, str(tmp))
        if scalings_out:
            with atomic_file(scalings_out) as tmp:
                save_file({"scalings": scalings.contiguous(), "input_ids": torch.tensor(ids, dtype=torch.int64)},
                          str(tmp))
        if tokens_out:
            with atomic_file(tokens_out) as tmp:
                tmp.write_text(json.dumps(new))
        print(tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new, flush=True)
    return new
