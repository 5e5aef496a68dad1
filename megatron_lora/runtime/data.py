"""Supervised fine-tuning data: JSONL in TRL's SFT formats, tokenised into fixed-length samples.

Formats, detected per file from its first example (every line must then have the same form):

- ``{"text": str}``: loss on every token.
- ``{"prompt": str, "completion": str}``: the two strings concatenated; loss on the completion.
- ``{"prompt": [messages], "completion": [messages]}``: rendered with the tokenizer's chat
  template; loss on the completion's turns.
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the chat template; loss on the
  assistant turns.

A turn's text is what rendering the conversation up to and including it adds to rendering it
up to before it, so templates need no special markers. A turn with loss is rendered after the
generation prompt (``add_generation_prompt=True``) when the template renders that prompt as a
prefix of the turn: the role header is then prompt, and the loss covers the content and the
end-of-turn token, which is what the model is asked to produce at inference. The EOS token ends
every example once: trailing whitespace after a final EOS is dropped, and EOS is appended when
the text does not end with it.

A sample is a dict of tensors of length ``seq_length``: ``tokens`` (inputs), ``labels`` (next
tokens), ``loss_mask`` (float, 1 where the label counts), ``position_ids`` (restarting at 0 for
each example) and ``document_ids`` (the example's index inside the sample, -1 on padding).
Examples longer than ``seq_length`` input positions are truncated (counted in the stats), and
examples left without a loss token are skipped (counted too: they would add nothing). With
``packing``, examples are packed into samples best-fit-decreasing; :func:`packed_attention_mask`
keeps them apart. The samples depend only on the file, ``seq_length`` and ``packing``.

The order contract: epoch e of training is a permutation of the samples drawn from (seed, e);
global batch k is items [kG, (k+1)G) of the concatenated epochs (:func:`batch_indices`), and
data-parallel rank d takes the d-th contiguous G/DP slice of it, split into micro-batches in
order (:func:`rank_micro_batches`). A run resumed at global batch k, at any DP size, therefore
sees the same global batches as the uninterrupted run.
"""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

Sample = dict[str, torch.Tensor]
#: The random stream of the evaluation split, far past any epoch number (epoch streams are (seed, e)).
_EVAL_STREAM = 2**62


@dataclass
class SftStats:
    """What loading a file did; ``summary()`` is the line a job prints."""

    path: str
    format: str
    examples: int = 0  # non-empty lines
    truncated: int = 0  # examples cut to seq_length input positions
    truncated_tokens: int = 0  # input positions those cuts dropped
    dropped: int = 0  # examples without a loss token (after truncation): not used
    samples: int = 0
    tokens: int = 0  # input positions that are not padding
    loss_tokens: int = 0

    def summary(self) -> str:
        text = (f"{self.path}: {self.examples} examples ({self.format}) -> {self.samples} samples, "
                f"{self.tokens} tokens, {self.loss_tokens} with loss")
        if self.truncated:
            text += f"; {self.truncated} examples truncated ({self.truncated_tokens} tokens dropped)"
        if self.dropped:
            text += f"; {self.dropped} examples without loss tokens skipped"
        return text


@dataclass
class _Example:
    """One tokenised example as input positions: inputs, next-token labels, loss flags."""

    inputs: list[int]
    labels: list[int]
    loss: list[bool]


# -- reading and rendering -------------------------------------------------------------------
def _detect(obj: dict) -> str:
    if "messages" in obj:
        return "messages"
    if "prompt" in obj and "completion" in obj:
        return "conversational prompt-completion" if isinstance(obj["prompt"], list) else "prompt-completion"
    if "text" in obj:
        return "text"
    raise ValueError("expected the keys 'text', 'prompt' and 'completion', or 'messages'; found "
                     f"{sorted(obj)}")


def _check_messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list of messages")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"each message of '{key}' must be an object with string 'role' and 'content'")
    return value


def _check_str(obj: dict, key: str) -> str:
    if not isinstance(obj.get(key), str):
        raise ValueError(f"'{key}' must be a string")
    return obj[key]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_segments(tokenizer, messages: list[dict], with_loss: Sequence[bool]) -> list[tuple[str, bool]]:
    """(text, has loss) pieces of a rendered conversation, turn by turn."""
    segments, rendered = [], ""
    for i, loss in enumerate(with_loss):
        upto = _render(tokenizer, messages[: i + 1], False)
        if not upto.startswith(rendered):
            raise ValueError(f"the chat template does not render turn {i} as an extension of the turns before it")
        start = len(rendered)
        if loss:
            prompt = _render(tokenizer, messages[:i], True)
            if len(prompt) > start and upto.startswith(prompt):
                segments.append((prompt[start:], False))
                start = len(prompt)
        segments.append((upto[start:], loss))
        rendered = upto
    return segments


def _segments(obj: dict, form: str, tokenizer) -> tuple[list[tuple[str, bool]], bool]:
    """(text, has loss) pieces of one example, and whether the tokenizer adds its special tokens
    (chat templates write their own)."""
    if form == "text":
        return [(_check_str(obj, "text"), True)], True
    if form == "prompt-completion":
        return [(_check_str(obj, "prompt"), False), (_check_str(obj, "completion"), True)], True
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer has no chat template for {form} examples")
    if form == "messages":
        messages = _check_messages(obj.get("messages"), "messages")
        return _chat_segments(tokenizer, messages, [m["role"] == "assistant" for m in messages]), False
    prompt = _check_messages(obj.get("prompt"), "prompt")
    completion = _check_messages(obj.get("completion"), "completion")
    with_loss = [False] * len(prompt) + [True] * len(completion)
    return _chat_segments(tokenizer, prompt + completion, with_loss), False


def _tokenize(segments: list[tuple[str, bool]], special: bool, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the joined segments, each flagged by the segment its first character is in;
    ends with exactly one EOS."""
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    text = "".join(s for s, _ in segments)
    if eos and text.rstrip().endswith(eos):
        text = text.rstrip()
    char_loss = np.zeros(len(text) + 1, dtype=bool)  # +1: a flag for the end (appended EOS)
    pos = 0
    for piece, loss in segments:
        char_loss[pos: pos + len(piece)] = loss
        pos += len(piece)
    char_loss[len(text)] = segments[-1][1]
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = list(enc["input_ids"])
    # Tokens the tokenizer adds itself (BOS) are never loss; special tokens written in the text are.
    flags = [bool(char_loss[min(a, len(text))]) and not added
             for (a, _), added in zip(enc["offset_mapping"], enc["special_tokens_mask"])]
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        flags.append(False)
    # The final EOS, written, added by the tokenizer or appended here, belongs to the last segment.
    flags[-1] = bool(char_loss[len(text)])
    return ids, flags


def read_examples(path: str | Path, tokenizer) -> tuple[list[list[int]], list[list[bool]], str]:
    """Token ids and loss flags of every example of a JSONL file, and its format.

    Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token")
    ids, flags, form = [], [], None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("expected a JSON object")
                line_form = _detect(obj)
                if form is None:
                    form = line_form
                elif line_form != form:
                    raise ValueError(f"a {line_form} example in a file of {form} examples")
                segments, special = _segments(obj, form, tokenizer)
                example_ids, example_flags = _tokenize(segments, special, tokenizer)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            except Exception as e:  # template errors come in several types: report them all the same way
                raise ValueError(f"{path}:{lineno}: {e}") from None
            ids.append(example_ids)
            flags.append(example_flags)
    if form is None:
        raise ValueError(f"{path}: no examples")
    return ids, flags, form


# -- samples --------------------------------------------------------------------------------
def held_out_prompts(path: str | Path, tokenizer, n: int) -> list[tuple[list[int], str]]:
    """(prompt token ids, reference answer) of the first ``n`` examples of a JSONL file that
    have a prompt: the tokens before the first loss token, and the text of the first loss
    span (``text`` examples have no prompt and are skipped)."""
    ids, flags, _ = read_examples(path, tokenizer)
    out = []
    for example, loss in zip(ids, flags):
        if len(out) == n:
            break
        first = loss.index(True) if True in loss else 0
        if first == 0:
            continue
        end = loss.index(False, first) if False in loss[first:] else len(loss)
        out.append((example[:first], tokenizer.decode(example[first:end], skip_special_tokens=True)))
    return out


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: groups of example indices whose lengths fit ``capacity``."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, b))
    return [sorted(b) for b in bins]


def _sample(docs: list[_Example], seq_length: int, pad_id: int) -> Sample:
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    position_ids = torch.zeros(seq_length, dtype=torch.long)
    document_ids = torch.full((seq_length,), -1, dtype=torch.long)
    at = 0
    for d, doc in enumerate(docs):
        n = len(doc.inputs)
        tokens[at: at + n] = torch.tensor(doc.inputs)
        labels[at: at + n] = torch.tensor(doc.labels)
        loss_mask[at: at + n] = torch.tensor(doc.loss, dtype=torch.float32)
        position_ids[at: at + n] = torch.arange(n)
        document_ids[at: at + n] = d
        at += n
    position_ids[at:] = torch.arange(seq_length - at)
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                document_ids=document_ids)


def load_sft_samples(path: str | Path, tokenizer, seq_length: int, packing: bool = False) -> tuple[list[Sample], SftStats]:
    """The samples of a JSONL file (see the module docstring) and what loading did."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    all_ids, all_flags, form = read_examples(path, tokenizer)
    stats = SftStats(path=str(path), format=form, examples=len(all_ids))
    examples = []
    for ids, flags in zip(all_ids, all_flags):
        positions = len(ids) - 1
        if positions > seq_length:
            stats.truncated += 1
            stats.truncated_tokens += positions - seq_length
            ids, flags = ids[: seq_length + 1], flags[: seq_length + 1]
        example = _Example(inputs=ids[:-1], labels=ids[1:], loss=flags[1:])
        if not any(example.loss):
            stats.dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no example has a loss token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups = _pack([len(e.inputs) for e in examples], seq_length) if packing else [[i] for i in range(len(examples))]
    samples = [_sample([examples[i] for i in g], seq_length, pad_id) for g in groups]
    stats.samples = len(samples)
    stats.tokens = sum(len(e.inputs) for e in examples)
    stats.loss_tokens = sum(sum(e.loss) for e in examples)
    return samples, stats


def packed_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool [b, 1, s, s], True where attention is masked: causal within each document.

    Padding (-1) attends to padding causally, so no row is fully masked."""
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def stack_samples(samples: Sequence[Sample]) -> Sample:
    """A micro-batch: each field stacked to [b, s]."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# -- order ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_samples: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_samples))


def batch_indices(n_samples: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Sample indices of global batch ``step`` (0-based): items [kG, (k+1)G) of the
    concatenation of epochs, epoch e being a permutation drawn from (seed, e)."""
    if n_samples < 1 or global_batch_size < 1 or step < 0 or seed < 0:
        raise ValueError(f"batch_indices needs n_samples, global_batch_size >= 1 and step, seed >= 0; got "
                         f"{n_samples}, {global_batch_size}, {step}, {seed}")
    epoch, offset = divmod(step * global_batch_size, n_samples)
    out: list[int] = []
    while len(out) < global_batch_size:
        perm = _epoch_permutation(n_samples, seed, epoch)
        out.extend(perm[offset: offset + global_batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


def rank_micro_batches(indices: Sequence[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """Data-parallel rank ``dp_rank``'s part of a global batch: the dp_rank-th contiguous
    G/DP slice, split into micro-batches in order."""
    g = len(indices)
    if g % dp_size or (g // dp_size) % micro_batch_size:
        raise ValueError(f"global batch size {g} is not a multiple of data-parallel size {dp_size} x "
                         f"micro batch size {micro_batch_size}")
    per_rank = g // dp_size
    mine = list(indices[dp_rank * per_rank: (dp_rank + 1) * per_rank])
    return [mine[i: i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def split_eval(samples: list[Sample], eval_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): a round(n x fraction) (at least 1) random subset, drawn from the seed, held
    out; both keep the samples' order."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"the evaluation fraction must be between 0 and 1, got {eval_fraction}")
    n_eval = max(1, round(len(samples) * eval_fraction))
    if n_eval >= len(samples):
        raise ValueError(f"an evaluation fraction of {eval_fraction} leaves no training sample of {len(samples)}")
    held = set(int(i) for i in np.random.default_rng([seed, _EVAL_STREAM]).permutation(len(samples))[:n_eval])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])
