"""``--tiny``: a small random Llama and a synthetic task, the fast smoke run of the main job.

The task: each sequence counts up from a random start, ``t, t+1, t+2, ... (mod vocab)``.
Every token after the first is determined by the one before it, but the frozen random base
does not know the successor map; the adapters must learn it. The first
:data:`PROMPT_TOKENS` labels of a sequence play the part of a prompt: they carry no loss.

Samples have the SFT data's interface: dicts of ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` and ``document_ids``, each of length ``seq_length``.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The random base model of ``--tiny`` without ``--base`` (HF Llama config fields).
TINY_LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                  tie_word_embeddings=False)
PROMPT_TOKENS = 4
#: Samples in the synthetic training and evaluation sets.
TRAIN_SAMPLES = 4096
EVAL_SAMPLES = 64


def write_tiny_base(directory: str | Path, seed: int) -> None:
    """Save the random :data:`TINY_LLAMA` (drawn from ``seed``) as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
        # HF's small init (std 0.02) gives near-uniform logits; a larger one gives the
        # base a loss the adapters can visibly reduce within a few steps.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    model.save_pretrained(directory)


class CountingData:
    """``n`` counting sequences; sample ``i`` depends only on (seed, i)."""

    def __init__(self, n: int, seq_length: int, vocab: int, seed: int):
        self.n, self.seq_length, self.vocab, self.seed = n, seq_length, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, self.vocab, (1,), generator=gen))
        ids = (start + torch.arange(self.seq_length + 1)) % self.vocab
        loss_mask = torch.ones(self.seq_length)
        loss_mask[:PROMPT_TOKENS] = 0.0
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": loss_mask,
                "position_ids": torch.arange(self.seq_length),
                "document_ids": torch.zeros(self.seq_length, dtype=torch.long)}


def counting_datasets(seq_length: int, vocab: int, seed: int) -> tuple[CountingData, CountingData]:
    """(train, eval) sets, disjoint by seed."""
    return (CountingData(TRAIN_SAMPLES, seq_length, vocab, seed),
            CountingData(EVAL_SAMPLES, seq_length, vocab, seed + 1))
