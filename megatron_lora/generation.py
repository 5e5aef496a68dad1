"""Tensor-parallel inference on a megatron-core GPTModel: full logits and KV-cache generation.

Logits are gathered over TP and cut to the real vocabulary (``model.unpadded_vocab_size``,
set by :func:`megatron_lora.hf_import.load_hf_base`), so vocabulary padding never reaches
the caller or the sampler. Every TP rank holds the same gathered logits and samples with the
same seeded generator, so all ranks pick the same tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from safetensors.torch import save_file

from megatron_lora.distributed import init_distributed
from megatron_lora.gpt import positions_for
from megatron_lora.hf_import import eos_token_ids, hf_model_facts, load_hf_base, read_hf_config
from megatron_lora.peft_format import load_any_adapter


def _vocab(model) -> int:
    return getattr(model, "unpadded_vocab_size", model.vocab_size)


def _check_length(model, length: int) -> None:
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("inference needs pipeline_model_parallel_size=1")
    if length > model.max_sequence_length:
        raise ValueError(
            f"sequence of {length} tokens exceeds the model's max_sequence_length="
            f"{model.max_sequence_length} (HF max_position_embeddings or sliding_window)"
        )


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] fp32 logits of ``ids`` [b, s], gathered over TP, padding cut off."""
    _check_length(model, ids.shape[1])
    local = model(ids, positions_for(ids), None)
    return gather_from_tensor_model_parallel_region(local)[..., : _vocab(model)].float()


def _same_seed(seed: Optional[int]) -> int:
    """``seed``, or one drawn on TP rank 0 and shared, so every TP rank samples alike."""
    if seed is not None:
        return seed
    box = torch.tensor([random.getrandbits(62) if ps.get_tensor_model_parallel_rank() == 0 else 0])
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(box, ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    return int(box.item())


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy at temperature 0; else temperature then nucleus (top-p) sampling as HF's
    TopPLogitsWarper does it (drop tokens whose ascending cumulative probability is
    <= 1 - top_p, always keep the most likely one)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort()
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.no_grad()
def generate(
    model,
    prompt_ids: Iterable[int],
    max_new_tokens: int,
    eos_token_id: Union[int, Iterable[int], None] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    output_logits: bool = False,
):
    """New token ids after ``prompt_ids`` (batch 1), decoding with a KV cache.

    Greedy when ``temperature`` is 0. Stops after an EOS token (included, as HF's generate
    does) or ``max_new_tokens``. With ``output_logits`` also returns each step's fp32 logits
    [vocab] (the distribution the step chose from, before temperature / top-p).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("empty prompt")
    _check_length(model, len(prompt) + max_new_tokens)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    gen = torch.Generator().manual_seed(_same_seed(seed))
    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt])
    new_tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        offset = context.sequence_len_offset
        positions = torch.arange(offset, offset + ids.shape[1]).unsqueeze(0)
        # In inference mode megatron-core computes only the last position and gathers over TP.
        out = model(ids, positions, None, inference_context=context, runtime_gather_output=True)
        logits = out[0, -1, : _vocab(model)].float()
        context.sequence_len_offset += ids.shape[1]
        context.enable_decode_mode()
        token = _next_token(logits, temperature, top_p, gen)
        new_tokens.append(token)
        step_logits.append(logits)
        if token in eos:
            break
        ids = torch.tensor([[token]])
    return (new_tokens, step_logits) if output_logits else new_tokens


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _tokenizer(base: Path, required: bool):
    if not any((base / f).is_file() for f in _TOKENIZER_FILES):
        if required:
            raise FileNotFoundError(f"{base}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) for --prompt")
        return None
    from transformers import AutoTokenizer  # only the text front end needs transformers

    return AutoTokenizer.from_pretrained(str(base))


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename, so a failure never leaves a partial file at ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def generate_from_dirs(
    base: str,
    prompt: Optional[str] = None,
    input_ids: Optional[str] = None,
    adapter: Optional[str] = None,
    tp: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    dtype: str = "fp32",
    logits_out: Optional[str] = None,
    tokens_out: Optional[str] = None,
) -> list[int]:
    """What ``scripts/generate.py`` does: import the HF base at TP ``tp`` (+ adapter), run
    the prompt, generate; rank 0 prints the text and writes the optional output files."""
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
    init_distributed(tp)
    model, _ = load_hf_base(base_dir, _DTYPES[dtype])
    if adapter is not None:
        load_any_adapter(model, adapter, adapter_name="default")
    logits = forward_logits(model, torch.tensor([ids]))[0] if logits_out else None
    new = generate(model, ids, max_new_tokens, eos_token_ids(base_dir), temperature, top_p, seed)
    if dist.get_rank() == 0:
        if logits_out:
            _write_atomic(Path(logits_out), lambda p: save_file({"logits": logits.contiguous()}, str(p)))
        if tokens_out:
            _write_atomic(Path(tokens_out), lambda p: p.write_text(json.dumps(new)))
        print(tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new, flush=True)
    return new
