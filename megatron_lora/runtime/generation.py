"""Tensor-parallel inference on a megatron-core GPTModel: full logits and KV-cache generation.

Works on a GPTModel (with or without LoRA) and on an :class:`~megatron_lora.model.xlora.XLoraModel`.
X-LoRA decodes with two KV caches, one for the scaling pass and one for the scaled pass,
so a new token costs two single-token passes and equals full recomputation; with
``xlora_scalings_once`` the prompt's last-token scalings are reused for every new token
and decoding runs the scaled pass alone.

Logits are gathered over TP and cut to the real vocabulary (``model.unpadded_vocab_size``,
set by :func:`megatron_lora.hf.importer.load_hf_base`), so vocabulary padding never reaches
the caller or the sampler. Every TP rank holds the same gathered logits and samples with the
same seeded generator, so all ranks pick the same tokens.

Ids, positions, KV caches, logits and the sampling generator live on ``device()``; a new
token crosses to the host once (its id decides EOS and is returned), and is fed back from
the device.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from safetensors.torch import save_file

from megatron_lora.runtime.distributed import init_distributed
from megatron_lora.errors import check_positive_int
from megatron_lora.model.gpt import positions_for, real_vocab_size
from megatron_lora.hf.importer import eos_token_ids, hf_model_facts, load_hf_base, read_hf_config
from megatron_lora.formats.outputs import atomic_file, check_output_file
from megatron_lora.model.adapters import load_adapter
from megatron_lora.model.xlora import XLoraModel, base_gpt, load_xlora
from megatron_lora.formats.detect import detect
from megatron_lora.parallel.lora_layers import LoraComputeDtype, configure_lora_layers
from megatron_lora.parallel.device import device


def _check_length(model, length: int) -> None:
    model = base_gpt(model)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("inference needs pipeline_model_parallel_size=1")
    if length > model.max_sequence_length:
        raise ValueError(
            f"sequence of {length} tokens exceeds the model's max_sequence_length="
            f"{model.max_sequence_length} (HF max_position_embeddings or sliding_window)"
        )


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] fp32 logits of ``ids`` [b, s] (moved to ``device()``), gathered over
    TP, padding cut off."""
    _check_length(model, ids.shape[1])
    ids = ids.to(device())
    local = model(ids, positions_for(ids), None)
    return gather_from_tensor_model_parallel_region(local)[..., : real_vocab_size(base_gpt(model))].float()


def _same_seed(seed: Optional[int]) -> int:
    """``seed``, or one drawn on TP rank 0 and shared, so every TP rank samples alike."""
    if seed is not None:
        return seed
    box = torch.tensor([random.getrandbits(62) if ps.get_tensor_model_parallel_rank() == 0 else 0],
                       device=device())
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(box, ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    return int(box.item())


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """The next token id (int64, shape [1], on the logits' device). Greedy at temperature 0;
    else temperature then nucleus (top-p) sampling as HF's TopPLogitsWarper does it (drop
    tokens whose ascending cumulative probability is <= 1 - top_p, always keep the most
    likely one)."""
    if temperature == 0:
        return logits.argmax().view(1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort()
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


class KVCache:
    """Runs ``model`` on the next tokens of one sequence, keeping its keys and values."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_len)
        self.contexts = [self.context]  # every cache advances by the tokens of each call

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] (fp32, gathered, unpadded) of the last of ``ids`` [1, s]."""
        ids = ids.to(device())  # a no-op for the ids generate feeds back
        offset = self.context.sequence_len_offset
        positions = torch.arange(offset, offset + ids.shape[1], device=ids.device).unsqueeze(0)
        # In inference mode megatron-core computes only the last position and gathers over TP.
        out = self._forward(ids, positions)
        for context in self.contexts:
            context.sequence_len_offset += ids.shape[1]
            context.enable_decode_mode()
        return out[0, -1, : real_vocab_size(base_gpt(self.model))].float()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(ids, positions, None, inference_context=self.context, runtime_gather_output=True)


class XLoraKVCache(KVCache):
    """X-LoRA decoding: the scaling pass and the scaled pass each keep their own cache.

    With ``scalings_once`` only the prompt runs the scaling pass; every new token reuses
    the last prompt token's scalings.
    """

    def __init__(self, model: XLoraModel, max_len: int, scalings_once: bool = False):
        super().__init__(model, max_len)
        self.scaling_context = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_len)
        # The classifier needs the hidden state of every position, not just the last one.
        self.scaling_context.materialize_only_last_token_logits = False
        self.contexts.append(self.scaling_context)
        self.scalings_once = scalings_once
        self.fixed: Optional[torch.Tensor] = None  # [1, 1, n_layers, n_experts] once computed

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.model(ids, positions, None, inference_context=self.context, runtime_gather_output=True,
                              fixed_scalings=self.fixed.expand(-1, ids.shape[1], -1, -1))
        out = self.model(ids, positions, None, inference_context=self.context, runtime_gather_output=True,
                         scaling_inference_context=self.scaling_context)
        if self.scalings_once:
            self.fixed = self.model.get_latest_scalings()[:, -1:]
        return out


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
    xlora_scalings_once: bool = False,
):
    """New token ids after ``prompt_ids`` (batch 1), decoding with a KV cache.

    ``model`` is a GPTModel or an XLoraModel (``xlora_scalings_once``: see the module
    docstring). Greedy when ``temperature`` is 0. Stops after an EOS token (included, as
    HF's generate does) or ``max_new_tokens``. With ``output_logits`` also returns each
    step's fp32 logits [vocab] (the distribution the step chose from, before temperature /
    top-p).
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:  # also refuses nan
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("empty prompt")
    _check_length(model, len(prompt) + max_new_tokens)
    if isinstance(model, XLoraModel):
        cache = XLoraKVCache(model, len(prompt) + max_new_tokens, xlora_scalings_once)
    elif xlora_scalings_once:
        raise ValueError("xlora_scalings_once needs an X-LoRA model")
    else:
        cache = KVCache(model, len(prompt) + max_new_tokens)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    gen = torch.Generator(device=device()).manual_seed(_same_seed(seed))
    ids = torch.tensor([prompt], device=device())
    new_tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        logits = cache(ids)
        next_id = _next_token(logits, temperature, top_p, gen)
        token = int(next_id)  # the one host sync per token
        new_tokens.append(token)
        step_logits.append(logits)
        if token in eos:
            break
        ids = next_id.view(1, 1)
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
    scalings_out: Optional[str] = None,
    xlora_scalings_once: bool = False,
    expert_model_parallel_size: int = 1,
) -> list[int]:
    """What ``scripts/generate.py`` does: import the HF base at TP ``tp`` (and, for a mixture
    of experts, expert-parallel size ``expert_model_parallel_size``) (+ a LoRA or
    X-LoRA adapter, detected), run the prompt, generate; rank 0 prints the text and writes
    the optional output files.

    ``scalings_out`` (X-LoRA): the prompt's scalings as PEFT logs them (after softmax,
    before top-k), key ``scalings`` [seq, n_layers, n_experts] fp32, and the prompt's
    ``input_ids`` [seq].
    """
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
            try:
                check_output_file(out)
            except OSError as e:
                raise type(e)(f"{flag}: {e}") from None
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter {adapter} does not exist (or is not a directory)")
    xlora = adapter is not None and detect(adapter).is_xlora
    if (scalings_out or xlora_scalings_once) and not xlora:
        raise ValueError(f"--scalings-out and --xlora-scalings-once need an X-LoRA --adapter, got {adapter!r}")
    init_distributed(tp, expert_model_parallel_size=expert_model_parallel_size)
    model, _ = load_hf_base(base_dir, _DTYPES[dtype])
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
