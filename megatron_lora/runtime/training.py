"""The main job: LoRA fine-tuning of a megatron-core GPT at any tensor-parallel size.

:func:`finetune` builds a base model (a small random GPT, or an HF model imported with
:func:`megatron_lora.hf.importer.load_hf_base`), adds trainable adapters, trains them with
AdamW on a deterministic synthetic task and saves them with
:func:`megatron_lora.save_adapter`. It runs under ``torchrun`` and as one plain process.

The task: each sequence counts up from a random start, ``t, t+1, t+2, ... (mod vocab)``.
Every token after the first is determined by the one before it, but the frozen random base
does not know the successor map; the adapters must learn it (the loss falls well below the
base's, though rank-r updates of a random network cannot reach zero).

With ``xlora`` it trains an X-LoRA mixture instead: the classifier (and, with
``xlora_trainable_adapters``, the experts) over frozen LoRA experts, given as directories
or, by default, made here as small random LoRA adapters (:data:`RANDOM_EXPERTS`), and
saves a PEFT X-LoRA directory (experts in subfolders "0".."n-1").
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import nn

from megatron_lora.model.adapters import save_adapter
from megatron_lora.config import LoraConfig
from megatron_lora.runtime.distributed import init_distributed
from megatron_lora.model.gpt import build_gpt, gpt_config, positions_for, real_vocab_size
from megatron_lora.hf.layout import HF_PROJECTIONS
from megatron_lora.model.lora import add_adapters, apply_lora, trainable_parameters_report
from megatron_lora.formats.outputs import shared_temp_dir
from megatron_lora.model.xlora import XLoraConfig, XLoraModel, apply_xlora, base_gpt, save_xlora
from megatron_lora.formats.xlora import read_xlora, write_peft_xlora

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_OUT = "out/finetune-adapter"

#: The random base model of a run without ``--base``.
RANDOM_GPT = dict(num_layers=4, hidden_size=128, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=352)
RANDOM_VOCAB = 256
#: (r, target_modules) of the random experts an X-LoRA run makes when none are given.
RANDOM_EXPERTS = [(4, ["q_proj", "v_proj", "down_proj"]), (8, ["k_proj", "o_proj", "up_proj"]),
                  (2, ["q_proj", "gate_proj", "down_proj"])]


@dataclass
class FinetuneOptions:
    """Everything a fine-tuning run depends on (the CLI flags of ``scripts/finetune.py``)."""

    tp: int = 2
    steps: int = 200
    lr: float = 3e-3
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(HF_PROJECTIONS))
    seq_len: int = 32
    batch_size: int = 16
    out: str = DEFAULT_OUT
    seed: int = 1234
    base: Optional[str] = None  # HF model directory; None: a small random GPT
    dtype: str = "fp32"
    xlora: bool = False  # train an X-LoRA mixture instead of one LoRA adapter
    xlora_experts: Optional[list[str]] = None  # expert directories; None: random experts
    xlora_trainable_adapters: bool = False  # X-LoRA use_trainable_adapters
    xlora_depth: int = 1
    xlora_layerwise_scalings: bool = True

    def __post_init__(self) -> None:
        for name in ("tp", "steps", "r", "seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {name}={getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got lr={self.lr}")
        if not self.xlora and (self.xlora_experts or self.xlora_trainable_adapters):
            raise ValueError("xlora_experts and xlora_trainable_adapters need xlora=True")


@dataclass
class FinetuneResult:
    start_loss: float  # held-out loss before training
    final_loss: float  # held-out loss after training
    losses: list[float]  # training loss of every step
    out: str


# -- model ----------------------------------------------------------------------------------
def build_base(options: FinetuneOptions) -> nn.Module:
    """The frozen-to-be base model: imported from ``options.base`` or a small random GPT."""
    dtype = DTYPES[options.dtype]
    if options.base is not None:
        from megatron_lora.hf.importer import load_hf_base

        model, _ = load_hf_base(options.base, dtype)
        return model
    config = gpt_config(**RANDOM_GPT, tensor_model_parallel_size=options.tp, params_dtype=dtype)
    return build_gpt(config, RANDOM_VOCAB, max_sequence_length=max(options.seq_len, 64))


# Adding adapters and saving them are the two steps another adapter kind replaces.
def add_lora(model: nn.Module, options: FinetuneOptions) -> LoraConfig:
    config = LoraConfig(r=options.r, lora_alpha=options.lora_alpha, target_modules=options.target_modules)
    apply_lora(model, config)
    return config


def save_lora(model: nn.Module, options: FinetuneOptions, config: LoraConfig) -> None:
    overwrite = Path(options.out) == Path(DEFAULT_OUT)
    save_adapter(model, options.out, config, overwrite=overwrite, extra={"finetune": asdict(options)})


def make_random_experts(options: FinetuneOptions, directory: Path) -> dict[str, str]:
    """Save the :data:`RANDOM_EXPERTS` for the base of ``options`` as megatron-lora
    checkpoints ``directory/expert<i>``; call on every rank. B is random (PEFT's
    ``init_lora_weights=False``), so each expert changes the model and the classifier has
    something to choose between."""
    model = build_base(options)  # a scratch copy: only the adapters' shapes matter
    experts = {}
    for i, (r, targets) in enumerate(RANDOM_EXPERTS):
        name = f"expert{i}"
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        add_adapters(model, config, adapter_name=name)
        save_adapter(model, directory / name, config, adapter_name=name)
        experts[name] = str(directory / name)
    return experts


def add_xlora(model: nn.Module, options: FinetuneOptions, scratch: Path) -> XLoraModel:
    """Wrap ``model`` in an XLoraModel over the given (or fresh random) experts."""
    if options.xlora_experts:
        experts = {str(i): d for i, d in enumerate(options.xlora_experts)}
    else:
        experts = make_random_experts(options, scratch)
    config = XLoraConfig(adapters=experts, xlora_depth=options.xlora_depth,
                         layerwise_scalings=options.xlora_layerwise_scalings,
                         use_trainable_adapters=options.xlora_trainable_adapters)
    return apply_xlora(model, config)


def save_xlora_as_peft(xmodel: XLoraModel, options: FinetuneOptions, scratch: Path) -> None:
    """Save the trained mixture as a PEFT X-LoRA directory at ``options.out``; call on every rank.

    Goes through our X-LoRA checkpoint (which gathers the sharded classifier and the
    experts as trained), then rank 0 writes the PEFT layout from it.
    """
    save_xlora(xmodel, scratch / "megatron")
    if dist.get_rank() == 0:
        write_peft_xlora(read_xlora(scratch / "megatron"), options.out, overwrite=Path(options.out) == Path(DEFAULT_OUT))
    dist.barrier()


# -- data and loss -----------------------------------------------------------------------------
def counting_batch(step: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """[batch, seq_len + 1] token ids counting up from random starts; the same on every
    rank that passes the same arguments (TP ranks must see the same batch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
    return (start + torch.arange(seq_len + 1)) % vocab


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``ids`` [b, s + 1], identical on every TP rank.

    The logits stay vocab-parallel; vocabulary padding columns are masked out.
    """
    inputs, labels = ids[:, :-1], ids[:, 1:]
    logits = model(inputs, positions_for(inputs), None).float()  # [b, s, vocab / TP]
    local = logits.shape[-1]
    first = ps.get_tensor_model_parallel_rank() * local
    real = real_vocab_size(base_gpt(model))
    if first + local > real:  # this rank holds padding columns
        pad = torch.arange(first, first + local, device=logits.device) >= real
        logits = logits.masked_fill(pad, float("-inf"))
    return vocab_parallel_cross_entropy(logits, labels).mean()


# -- training ----------------------------------------------------------------------------------
def _average_over_data_parallel(params: list[nn.Parameter], loss: torch.Tensor) -> None:
    """Average gradients and the reported loss over data-parallel replicas (if any)."""
    if ps.get_data_parallel_world_size() == 1:
        return
    group = ps.get_data_parallel_group()
    n = ps.get_data_parallel_world_size()
    for p in params:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(n)
    dist.all_reduce(loss, group=group)
    loss.div_(n)


def check_same_on_tp_ranks(value: float, what: str) -> None:
    """Raise if ``value`` differs between the tensor-parallel ranks."""
    t = torch.tensor([value], dtype=torch.float64)
    seen = [torch.zeros_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(seen, t, group=ps.get_tensor_model_parallel_group())
    if any(s.item() != value for s in seen):
        raise RuntimeError(f"{what} differs between tensor-parallel ranks: {[s.item() for s in seen]}")


def train(
    model: nn.Module,
    options: FinetuneOptions,
    progress: Optional[Callable[[int, float], None]] = None,
) -> FinetuneResult:
    """AdamW on the trainable parameters for ``options.steps`` steps of the counting task.

    Start and final losses are measured on one held-out batch (step index -1).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    vocab = real_vocab_size(base_gpt(model))
    dp_rank = ps.get_data_parallel_rank()
    held_out = counting_batch(-1, options.batch_size, options.seq_len, vocab, options.seed)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = lm_loss(model, held_out).item()
        model.train()
        return loss

    start = evaluate()
    losses = []
    for step in range(options.steps):
        ids = counting_batch(step, options.batch_size, options.seq_len, vocab, options.seed + 7919 * dp_rank)
        loss = lm_loss(model, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        _average_over_data_parallel(params, loss)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step}; try a lower lr")
        if progress:
            progress(step, losses[-1])
    final = evaluate()
    check_same_on_tp_ranks(final, "the final loss")
    return FinetuneResult(start, final, losses, options.out)


def finetune(options: FinetuneOptions) -> FinetuneResult:
    """Build, adapt, train and save; call on every rank (rank 0 shows progress)."""
    if Path(options.out) != Path(DEFAULT_OUT) and Path(options.out).exists():
        # Refuse before training rather than after it.
        raise FileExistsError(f"--out {options.out} already exists (only the default {DEFAULT_OUT} is overwritten)")
    init_distributed(options.tp, seed=options.seed)
    model = build_base(options)
    scratch = shared_temp_dir(options.out) if options.xlora else None
    try:
        if options.xlora:
            model = add_xlora(model, options, scratch)
            save = lambda: save_xlora_as_peft(model, options, scratch)  # noqa: E731
        else:
            config = add_lora(model, options)
            save = lambda: save_lora(model, options, config)  # noqa: E731
        result = _train_with_progress(model, options)
        save()
    finally:
        if scratch is not None and dist.get_rank() == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    if dist.get_rank() == 0:
        what = "X-LoRA (PEFT layout)" if options.xlora else "adapter"
        print(f"start loss {result.start_loss:.4f} -> final loss {result.final_loss:.4f} "
              f"(held-out batch, {options.steps} steps); {what} saved to {options.out}", flush=True)
    return result


def _train_with_progress(model: nn.Module, options: FinetuneOptions) -> FinetuneResult:
    rank0 = dist.get_rank() == 0
    report = trainable_parameters_report(model)  # a collective: every rank calls it
    bar = None
    if rank0:
        from tqdm import tqdm

        print(report, flush=True)
        bar = tqdm(total=options.steps, desc="finetune", unit="step")

    def progress(step: int, loss: float) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

    model.train()
    result = train(model, options, progress)
    if bar is not None:
        bar.close()
    return result
