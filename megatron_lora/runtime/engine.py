"""megatron-core's training engine around a LoRA / X-LoRA model, at any TP x PP x DP.

One optimizer step (:meth:`Engine.train_step`) is megatron-core's: its
``DistributedDataParallel`` (gradient buffers and the data-parallel reduction),
``get_forward_backward_func`` over micro-batches (no pipelining or 1F1B),
``finalize_model_grads``, its optimizer wrapper (gradient clipping, fp16 loss scaling) and
``OptimizerParamScheduler``. The adapters are fp32 parameters, so the bf16/fp16 wrapper
keeps no second master copy of them.

The step's objective (a contract): the summed token cross-entropy over every loss token of
the global batch divided by their count (``calculate_per_token_loss=True``: each
micro-batch returns its sum and its count and ``finalize_model_grads`` divides the
gradients by the global count), so the gradient does not depend on how the batch is split.
A mixture of experts built with megatron-core's load-balancing loss
(``moe_router_load_balancing_type="aux_loss"``, ``moe_aux_loss_coeff`` > 0) adds
``moe_aux_loss_coeff`` x the mean over the global batch's micro-batches of the sum over MoE
layers of each micro-batch's load-balancing loss (:class:`StepReport` ``aux_loss``):
Megatron-LM's weighting without per-token loss and HF's with gradient accumulation, whatever
the share of tokens that carry a label, and the same at every TP x EP x expert-TP x SP x DP.

The order of the samples is :mod:`megatron_lora.runtime.data`'s. Every tensor lives on
``torch.cuda.current_device()`` (the CPU under :mod:`parallel.cpu`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import Router
from torch import nn

from megatron_lora.model.lora import allreduce_tied_adapter_grads
from megatron_lora.parallel.device import device
from megatron_lora.runtime.data import Sample, batch_indices, rank_micro_batches, stack_samples
from megatron_lora.model.gpt import real_vocab_size
from megatron_lora.parallel.cpu import cuda_on_cpu
from megatron_lora.model.gpt import DTYPES

LR_DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass
class EngineSettings:
    """The optimisation settings of a run (``scripts/finetune.py``'s flags of the same names)."""

    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    train_iters: int
    lr: float
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: str = "linear"
    clip_grad: float = 1.0  # 0: no clipping
    weight_decay: float = 0.0
    dtype: str = "fp32"  # the base model's; adapters stay fp32
    seed: int = 1234
    eval_iters: Optional[int] = None  # evaluation batches; None: the whole evaluation set

    def check(self, dp: int) -> None:
        """Raise ValueError naming the flag for settings that cannot run at data-parallel size ``dp``."""
        for flag, value in (("--micro-batch-size", self.micro_batch_size), ("--seq-length", self.seq_length),
                            ("--global-batch-size", self.global_batch_size), ("--train-iters", self.train_iters)):
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(f"--global-batch-size {self.global_batch_size} must be a multiple of "
                             f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {self.lr} and {self.min_lr}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r} is not one of {LR_DECAY_STYLES}")
        if self.lr_warmup_iters < 0 or self.lr_warmup_iters >= self.decay_iters:
            raise ValueError(f"--lr-warmup-iters {self.lr_warmup_iters} must be >= 0 and below "
                             f"--lr-decay-iters {self.decay_iters}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0, got {self.clip_grad}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters


@dataclass
class StepReport:
    loss: float  # the global batch's objective before the update
    lr: float  # the learning rate applied in the step
    grad_norm: Optional[float]  # before clipping; None when fp16 loss scaling skipped the step
    tokens: int  # loss tokens of the global batch
    seconds: float
    updated: bool  # False when fp16 loss scaling skipped the step
    aux_loss: Optional[float] = None  # the load-balancing term of the objective; None: the model has none


def token_losses(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [b, s] of vocab-parallel ``logits`` [b, s, vocab / TP],
    the same on every TP rank; columns of vocabulary padding take no probability."""
    logits = logits.float()
    local = logits.shape[-1]
    first = ps.get_tensor_model_parallel_rank() * local
    real = real_vocab_size(model)
    if first + local > real:  # this rank holds padding columns
        pad = torch.arange(first, first + local, device=logits.device) >= real
        logits = logits.masked_fill(pad, float("-inf"))
    return vocab_parallel_cross_entropy(logits, labels)


def _device_batch(samples: Sequence[Sample]) -> Sample:
    """A micro-batch on the device, where it enters the model."""
    return {k: v.to(device()) for k, v in stack_samples(samples).items()}


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained]


def _finalize_model_grads(model: list[nn.Module], *args, **kwargs) -> None:
    """megatron-core's ``finalize_model_grads``, then the sum of the tied adapters' gradients
    over the embedding group, which megatron-core does for the shared embedding weight only."""
    finalize_model_grads(model, *args, **kwargs)
    allreduce_tied_adapter_grads(model)


class Engine:
    """Trains the trainable parameters of ``model`` (this rank's pipeline stage).

    ``base`` is the GPTModel inside ``model`` (for its config and vocabulary);
    ``attention_mask`` maps a micro-batch's ``document_ids`` [b, s] to megatron-core's
    boolean mask (True = masked), or is None for the plain causal mask. It sets
    ``calculate_per_token_loss``, ``finalize_model_grads_func``, ``no_sync_func`` and
    ``grad_scale_func`` on ``base.config``, where megatron-core's schedules read them.

    The load-balancing loss reaches the gradient through megatron-core's
    ``MoEAuxLossAutoScaler``, whose backward scale the schedules set to
    ``grad_scale_func(1)`` for every micro-batch. ``finalize_model_grads`` then divides every
    gradient by the global batch's loss tokens N, so for the mean over its M micro-batches
    the scale must be N / M: ``grad_scale_func`` multiplies by it (and by the fp16 loss
    scale), and each micro-batch's token-loss sum is divided by it first, so the token loss
    keeps its own scale. (A router built with ``calculate_per_token_loss`` would multiply its
    loss by the tokens it routes instead: a weight that follows the labelled share of the
    batch and, under sequence parallelism, the shard size; the engine switches that off.)
    """

    def __init__(self, model: nn.Module, base: nn.Module, settings: EngineSettings,
                 train_data: Sequence[Sample], eval_data: Optional[Sequence[Sample]] = None,
                 attention_mask: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.settings, self.base = settings, base
        self.train_data, self.eval_data, self.attention_mask = train_data, eval_data, attention_mask
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        settings.check(self.dp)
        _check_trainable_experts(model)
        config: TransformerConfig = base.config
        config.calculate_per_token_loss = True
        config.finalize_model_grads_func = _finalize_model_grads
        self.aux_loss_coeff = _aux_loss_coeff(config)
        for module in model.modules():
            if isinstance(module, Router):  # read at construction; see the class docstring
                module.calculate_per_token_loss = False
        self._aux_scale = 1.0  # the load-balancing loss's backward scale for this step
        if not hasattr(model, "set_input_tensor"):
            model = _SingleStage(model, base)
        fp16, bf16 = settings.dtype == "fp16", settings.dtype == "bf16"
        with cuda_on_cpu():
            self.model = DistributedDataParallel(
                config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model)
            self.optimizer = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
                adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, clip_grad=settings.clip_grad,
                fp16=fp16, bf16=bf16, params_dtype=DTYPES[settings.dtype],
                initial_loss_scale=self._initial_loss_scale() if fp16 else None), [self.model])
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if any(group.get("is_expert_parallel") for group in optimizer.optimizer.param_groups):
                # megatron-core 0.16 gives the expert optimizer the dense TP group, by whose
                # rank the gradient norm skips copies of parameters not split over TP; an
                # expert's unsplit parameters (a LoRA factor) are copies over expert TP only.
                optimizer.tp_group = ps.get_expert_tensor_parallel_group()
        config.no_sync_func = self.model.no_sync
        self._fp16 = fp16
        config.grad_scale_func = self._grad_scale if fp16 or self.aux_loss_coeff else None
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=settings.min_lr,
            lr_warmup_steps=settings.lr_warmup_iters, lr_decay_steps=settings.decay_iters,
            lr_decay_style=settings.lr_decay_style, start_wd=settings.weight_decay,
            end_wd=settings.weight_decay, wd_incr_steps=settings.train_iters, wd_incr_style="constant",
            # A resumed run keeps the checkpoint's position in the schedule but this run's
            # flags for its shape, so a longer --train-iters extends the decay.
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
        self.forward_backward = get_forward_backward_func()
        self.step = 0  # completed optimizer steps

    def _initial_loss_scale(self) -> float:
        # Each micro-batch's loss is a token SUM (not a mean), so start from Megatron-LM's
        # usual per-token scale of 2**16 divided by the tokens of a micro-batch.
        return max(1.0, 2.0 ** 16 / (self.settings.micro_batch_size * self.settings.seq_length))

    def _grad_scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The schedules' backward scale: of each micro-batch's loss, and (at 1) of the
        load-balancing loss."""
        if self._fp16:
            loss = self.optimizer.scale_loss(loss)
        return loss * self._aux_scale

    # -- one micro-batch -------------------------------------------------------------------
    def _forward_step(self, data_iterator: Iterator[Sample], model: nn.Module):
        batch = next(data_iterator)
        mask = self.attention_mask(batch["document_ids"]) if self.attention_mask is not None else None
        output = model(batch["tokens"], batch["position_ids"], mask)
        return output, partial(self._loss, batch)

    def _loss(self, batch: Sample, logits: torch.Tensor):
        mask = batch["loss_mask"].float()
        total = (token_losses(self.base, logits, batch["labels"]) * mask).sum()
        count = mask.sum()
        # Divided by the load-balancing loss's scale, which _grad_scale multiplies back.
        return total / self._aux_scale, count.to(torch.int), {"loss": torch.stack([total.detach(), count])}

    def _run(self, micro_batches: list[list[int]], data: Sequence[Sample], forward_only: bool) -> tuple[float, int]:
        """Forward (and backward) over this rank's micro-batches; the global (loss sum, token count)."""
        batches = iter([_device_batch([data[i] for i in mb]) for mb in micro_batches])
        s = self.settings
        with cuda_on_cpu():
            out = self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=batches, model=self.model,
                num_microbatches=len(micro_batches), seq_length=s.seq_length,
                micro_batch_size=s.micro_batch_size, forward_only=forward_only)
        # The last stage holds the sums; reduce over data parallelism, then give every stage them.
        sums = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
        for item in out:
            sums += item["loss"].double()
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
        if not ps.is_pipeline_last_stage():
            sums.zero_()
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
        return sums[0].item(), int(sums[1].item())

    # -- training and evaluation --------------------------------------------------------------
    def train_step(self) -> StepReport:
        """Optimizer step ``self.step + 1`` on global batch ``self.step``."""
        start = time.perf_counter()
        s = self.settings
        indices = batch_indices(len(self.train_data), s.global_batch_size, self.step, s.seed)
        micro = rank_micro_batches(indices, self.dp_rank, self.dp, s.micro_batch_size)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        micro_batches = s.global_batch_size // s.micro_batch_size
        if self.aux_loss_coeff:
            clear_aux_losses_tracker()
            labelled = sum(int(self.train_data[i]["loss_mask"].sum()) for i in indices)
            self._aux_scale = max(labelled, 1) / micro_batches
        loss_sum, tokens = self._run(micro, self.train_data, forward_only=False)
        aux_loss = self._aux_loss(micro_batches) if self.aux_loss_coeff else None
        with cuda_on_cpu():
            updated, norm, _ = self.optimizer.step()
            if updated and s.clip_grad == 0:
                # Without clipping step() measures no norm; the gradients it prepared (the
                # DDP buffers' sums, unscaled) are still in place after the update.
                norm = self.optimizer.get_grad_norm()
        if updated:
            self.scheduler.step(increment=1)
        self.step += 1
        loss = loss_sum / max(tokens, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {self.step}; try a lower --lr")
        return StepReport(loss, lr, float(norm) if norm is not None else None, tokens,
                          time.perf_counter() - start, bool(updated), aux_loss)

    def _aux_loss(self, micro_batches: int) -> float:
        """The step's load-balancing term: megatron-core's tracker holds, per layer, this
        rank's share (its sequence-parallel shard's part) of each of its micro-batches' loss
        over the coefficient, summed over its micro-batches."""
        tracker = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        total = torch.zeros(1, dtype=torch.float64, device=torch.cuda.current_device())
        if tracker is not None:  # a pipeline stage without MoE layers has none
            total += tracker["values"].sum().double()
        for group in (ps.get_tensor_and_context_parallel_group(), ps.get_data_parallel_group(),
                      ps.get_pipeline_model_parallel_group()):
            dist.all_reduce(total, group=group)
        clear_aux_losses_tracker()
        return self.aux_loss_coeff * total.item() / micro_batches

    def evaluate(self) -> float:
        """Mean token loss over the evaluation set (or its first ``eval_iters`` global batches)."""
        if not self.eval_data:
            raise ValueError("no evaluation data")
        s = self.settings
        n = len(self.eval_data)
        if s.eval_iters is not None:
            n = min(n, s.eval_iters * s.global_batch_size)
        chunk = s.micro_batch_size * self.dp
        # A short last batch is filled with copies of sample 0 whose tokens carry no loss.
        padded = _PaddedEval(self.eval_data, n, -(-n // chunk) * chunk)
        total, tokens = 0.0, 0
        self.model.eval()
        for first in range(0, len(padded), s.global_batch_size):
            indices = list(range(first, min(first + s.global_batch_size, len(padded))))
            micro = rank_micro_batches(indices, self.dp_rank, self.dp, s.micro_batch_size)
            with torch.no_grad():
                part, count = self._run(micro, padded, forward_only=True)
            total, tokens = total + part, tokens + count
        self.model.train()
        return total / max(tokens, 1)


def _check_trainable_experts(model: nn.Module) -> None:
    """Refuse trainable expert parameters that megatron-core's DDP would reduce wrongly: at
    expert-parallel size 1 it treats experts as dense parameters (reduced over the dense
    data-parallel group), which is right only when each expert is split like the dense layers."""
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    if ep > 1 or etp == ps.get_tensor_model_parallel_world_size():
        return
    for name, module in model.named_modules():
        if getattr(module, "is_expert", False) and any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{name} is a trainable expert layer: with expert-parallel size 1 the expert-TP size "
                             f"({etp}) must equal the TP size ({ps.get_tensor_model_parallel_world_size()})")


def _aux_loss_coeff(config: TransformerConfig) -> float:
    """The load-balancing loss coefficient of a model config (0: none)."""
    kind = config.moe_router_load_balancing_type
    if not config.num_moe_experts or kind == "none" or not config.moe_aux_loss_coeff:
        return 0.0
    if kind != "aux_loss":
        raise ValueError(f"moe_router_load_balancing_type={kind!r} is not supported in training "
                         "(only 'aux_loss' and 'none')")
    return float(config.moe_aux_loss_coeff)


class _SingleStage(nn.Module):
    """A model without pipeline stages (X-LoRA, which trains at PP=1) in the shape the
    schedules expect of a stage: they look up ``model_type`` and hand each stage its input
    through ``set_input_tensor`` (here always None)."""

    def __init__(self, model: nn.Module, base: nn.Module):
        super().__init__()
        self.module = model
        self.model_type = base.model_type

    def set_input_tensor(self, tensor) -> None:
        assert tensor is None or tensor == [None], "a single-stage model takes no pipeline input"

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _PaddedEval:
    def __init__(self, data: Sequence[Sample], n: int, size: int):
        self.data, self.n, self.size = data, n, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample:
        if i < self.n:
            return self.data[i]
        return {**self.data[0], "loss_mask": torch.zeros_like(self.data[0]["loss_mask"])}
