"""The main job: LoRA (or X-LoRA) fine-tuning of an HF model at any TP x PP x DP.

:func:`finetune` imports the base (``--base``, or with ``--tiny`` and no base a small
random Llama), adds adapters drawn from (seed, global module name) so every layout starts
from the same adapter, and trains them with :class:`megatron_lora.runtime.engine.Engine` on SFT
data (``--data``) or, with ``--tiny``, the synthetic counting task of
:mod:`megatron_lora.runtime.tiny_task`. It evaluates, logs, saves resumable checkpoints
(:mod:`megatron_lora.runtime.checkpoints`) and ends with the adapter in ``SAVE/adapter/``
(a megatron-lora checkpoint, or our X-LoRA checkpoint) and optionally a PEFT directory.

A mixture-of-experts base trains at any TP x EP x expert-TP (x SP, required at TP > 1), the
data split over the dense data-parallel group as for a dense model, optionally with
megatron-core's load-balancing loss (``moe_aux_loss_coeff``; see the engine for its weight).

X-LoRA trains its classifier (and with ``xlora_trainable_adapters`` the experts) over
frozen LoRA experts, given as directories or made here as small random adapters
(:data:`RANDOM_EXPERTS`). X-LoRA training refuses pipeline parallelism: the scalings come
from the classifier on the last stage and would have to travel back to every stage's
layers, and their gradient forward again, outside megatron-core's schedules.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_lora.model.adapters import adapts_experts, save_adapter
from megatron_lora.config import LoraConfig
from megatron_lora.formats.convert import base_expert_names, convert
from megatron_lora.formats.peft import check_target_parameters_config
from megatron_lora.runtime.distributed import init_distributed
from megatron_lora.model.gpt import DTYPES
from megatron_lora.runtime.engine import Engine, EngineSettings, StepReport
from megatron_lora.model.gpt import real_vocab_size
from megatron_lora.hf.layout import HF_PROJECTIONS, MOE_LAYOUTS
from megatron_lora.model.lora import add_adapters, apply_lora, trainable_parameters_report
from megatron_lora.hf.importer import eos_token_ids
from megatron_lora.runtime import data
from megatron_lora.runtime.generation import generate
from megatron_lora.runtime.tiny_task import counting_datasets, write_tiny_base
from megatron_lora.formats.outputs import check_flag_output, from_rank0, shared_temp_dir
from megatron_lora.runtime.checkpoints import (
    LATEST,
    check_save_dir,
    iterations,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megatron_lora.model.xlora import XLoraConfig, XLoraModel, apply_xlora, base_gpt, save_xlora

DEFAULT_SAVE = "out/finetune"
#: Defaults that differ between a real run and ``--tiny`` (seq_length, lr).
REAL_DEFAULTS = {"seq_length": 1024, "lr": 2e-4}
TINY_DEFAULTS = {"seq_length": 32, "lr": 3e-3}
#: (r, target_modules) of the random experts an X-LoRA run makes when none are given.
RANDOM_EXPERTS = [(4, ["q_proj", "v_proj", "down_proj"]), (8, ["k_proj", "o_proj", "up_proj"]),
                  (2, ["q_proj", "gate_proj", "down_proj"])]


@dataclass
class FinetuneOptions:
    """Everything a fine-tuning run depends on (the flags of ``scripts/finetune.py``)."""

    base: Optional[str] = None  # HF model directory; None only with tiny (a small random Llama)
    data: Optional[str] = None  # training JSONL
    eval_data: Optional[str] = None  # evaluation JSONL
    eval_fraction: Optional[float] = None  # held out of --data when there is no --eval-data
    tiny: bool = False  # the synthetic counting task (and the random Llama without --base)
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert-parallel size (mixtures of experts)
    etp: Optional[int] = None  # expert tensor-parallel size; None: tp
    sequence_parallel: bool = False  # megatron-core's sequence parallelism (tp > 1; MoE bases at tp > 1 need it)
    moe_aux_loss_coeff: float = 0.0  # megatron-core's load-balancing loss coefficient (MoE bases; 0: none)
    micro_batch_size: int = 4
    global_batch_size: int = 16
    seq_length: Optional[int] = None  # None: REAL_DEFAULTS / TINY_DEFAULTS
    packing: bool = False
    train_iters: int = 200
    lr: Optional[float] = None  # None: REAL_DEFAULTS / TINY_DEFAULTS
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: str = "linear"
    clip_grad: float = 1.0
    eval_interval: int = 50
    eval_iters: Optional[int] = None  # None: the whole evaluation set
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(HF_PROJECTIONS))
    use_dora: bool = False
    ensure_weight_tying: bool = False  # PEFT's: lm_head's adapter is embed_tokens' on a tied base
    save: str = DEFAULT_SAVE
    save_interval: Optional[int] = None  # None: only at the end
    keep_checkpoints: int = 2
    load: Optional[str] = None
    log_jsonl: Optional[str] = None
    export_peft: Optional[str] = None
    moe_layout: str = "fused"  # PEFT layout of exported expert / router adapters (layout.MOE_LAYOUTS)
    seed: int = 1234
    dtype: str = "fp32"
    xlora: bool = False
    xlora_experts: Optional[list[str]] = None  # expert directories; None: random experts
    xlora_trainable_adapters: bool = False
    xlora_depth: int = 1
    xlora_layerwise_scalings: bool = True
    show_answers: int = 3  # held-out prompts answered before and after training (--eval-data, PP=1)

    def __post_init__(self) -> None:
        defaults = TINY_DEFAULTS if self.tiny else REAL_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for flag, value in (("--tensor-model-parallel-size", self.tp), ("--pipeline-model-parallel-size", self.pp),
                            ("--expert-model-parallel-size", self.ep),
                            ("--expert-tensor-parallel-size", 1 if self.etp is None else self.etp),
                            ("--eval-interval", self.eval_interval), ("--lora-r", self.lora_r)):
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sequence_parallel and self.seq_length % self.tp:
            raise ValueError(f"--sequence-parallel splits the sequence over TP: --seq-length {self.seq_length} "
                             f"must be a multiple of --tensor-model-parallel-size {self.tp}")
        if not self.moe_aux_loss_coeff >= 0:
            raise ValueError(f"--moe-aux-loss-coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        if self.save_interval is not None and self.save_interval <= 0:
            raise ValueError(f"--save-interval must be positive, got {self.save_interval}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for flag, on in (("--use-dora", self.use_dora), ("--ensure-weight-tying", self.ensure_weight_tying)):
            if on and self.xlora:
                raise ValueError(f"{flag} shapes the LoRA adapter this run trains: X-LoRA (--xlora) mixes "
                                 f"plain LoRA experts made apart")
        if self.moe_layout not in MOE_LAYOUTS:
            raise ValueError(f"--moe-layout {self.moe_layout!r} is not one of {list(MOE_LAYOUTS)}")
        if self.moe_layout != "fused" and not self.export_peft:
            raise ValueError(f"--moe-layout {self.moe_layout} applies to the PEFT export (--export-peft DIR)")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.tiny and (self.data or self.eval_data or self.eval_fraction is not None):
            raise ValueError("--tiny trains on synthetic data: drop --data/--eval-data/--eval-fraction")
        if not self.tiny and not self.data:
            raise ValueError("--data FILE.jsonl is required (or --tiny for the synthetic smoke run)")
        if not self.tiny and not self.base:
            raise ValueError("--base HF_DIR is required with --data (its tokenizer reads the data)")
        if self.eval_data and self.eval_fraction is not None:
            raise ValueError("give --eval-data or --eval-fraction, not both")
        if not self.xlora and (self.xlora_experts or self.xlora_trainable_adapters):
            raise ValueError("--xlora-experts and --xlora-trainable-adapters need --xlora")
        if self.xlora and self.pp > 1:
            raise ValueError("--xlora training needs --pipeline-model-parallel-size 1: the classifier's "
                             "scalings, made on the last stage, would have to reach every stage's layers")
        if self.xlora and self.sequence_parallel:
            raise ValueError("--xlora training does not support --sequence-parallel (its classifier reads "
                             "whole sequences)")

    def settings(self) -> EngineSettings:
        return EngineSettings(
            micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size,
            seq_length=self.seq_length, train_iters=self.train_iters, lr=self.lr, min_lr=self.min_lr,
            lr_warmup_iters=self.lr_warmup_iters, lr_decay_iters=self.lr_decay_iters,
            lr_decay_style=self.lr_decay_style, clip_grad=self.clip_grad, dtype=self.dtype,
            seed=self.seed, eval_iters=self.eval_iters)


@dataclass
class FinetuneResult:
    start_loss: Optional[float]  # evaluation loss before training (this run's first step); None: no evaluation set
    final_loss: Optional[float]  # evaluation loss after training
    losses: list[float]  # training loss of every step of this run
    adapter: str  # SAVE/adapter


# -- output locations ----------------------------------------------------------------------------
def _resume_if_any(options: FinetuneOptions) -> bool:
    """``--load`` equal to ``--save`` resumes when a checkpoint is there and starts at step 0 when
    none is yet (Megatron-LM's idiom, so one command both starts and continues a run); any other
    ``--load`` must hold a checkpoint."""
    return Path(options.load).resolve() == Path(options.save).resolve()


def check_outputs(options: FinetuneOptions) -> None:
    """Refuse every output location that would fail or clobber something, before any step."""
    save = Path(options.save)
    check_flag_output("--save", save / LATEST)
    check_save_dir(save)
    if iterations(save) and (options.load is None or Path(options.load).resolve() != save.resolve()):
        raise ValueError(f"--save {save} already holds checkpoints: pass --load {save} to resume, "
                         f"or choose another --save")
    if options.load is not None and not _resume_if_any(options) and not Path(options.load).is_dir():
        raise ValueError(f"--load {options.load} is not a directory")
    if options.export_peft is not None:
        check_flag_output("--export-peft", options.export_peft, directory=True)
    if options.log_jsonl is not None:
        check_flag_output("--log-jsonl", options.log_jsonl)


# -- model ------------------------------------------------------------------------------------
def load_base(base_dir: str | Path, options: FinetuneOptions) -> nn.Module:
    from megatron_lora.hf.importer import load_hf_base

    model, _ = load_hf_base(base_dir, DTYPES[options.dtype], options.sequence_parallel, options.moe_aux_loss_coeff)
    if model.config.num_moe_experts and options.tp > 1 and not options.sequence_parallel:
        # megatron-core's MoE layer refuses to train at TP > 1 without it.
        raise ValueError(f"{base_dir} is a mixture of experts: training it at --tensor-model-parallel-size "
                         f"{options.tp} needs --sequence-parallel")
    return model


def make_random_experts(base_dir: Path, options: FinetuneOptions, directory: Path) -> dict[str, str]:
    """Save the :data:`RANDOM_EXPERTS` for the base as megatron-lora checkpoints
    ``directory/expert<i>``; call on every rank. B is random (PEFT's
    ``init_lora_weights=False``), so each expert changes the model and the classifier has
    something to choose between."""
    model = load_base(base_dir, options)  # a scratch copy: only the adapters' shapes matter
    experts = {}
    for i, (r, targets) in enumerate(RANDOM_EXPERTS):
        name = f"expert{i}"
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        add_adapters(model, config, adapter_name=name, seed=options.seed + i)
        save_adapter(model, directory / name, config, adapter_name=name)
        experts[name] = str(directory / name)
    return experts


def add_xlora(model: nn.Module, base_dir: Path, options: FinetuneOptions, scratch: Path) -> XLoraModel:
    """Wrap ``model`` in an XLoraModel over the given (or fresh random) experts."""
    if options.xlora_experts:
        experts = {str(i): d for i, d in enumerate(options.xlora_experts)}
    elif model.config.num_moe_experts:
        raise ValueError(f"--xlora on {base_dir}, a mixture of experts, needs --xlora-experts: the random experts "
                         f"would adapt its MoE experts, which X-LoRA does not mix")
    else:
        experts = make_random_experts(base_dir, options, scratch)
    config = XLoraConfig(adapters=experts, xlora_depth=options.xlora_depth,
                         layerwise_scalings=options.xlora_layerwise_scalings,
                         use_trainable_adapters=options.xlora_trainable_adapters)
    return apply_xlora(model, config)


def _tokenizer(options: FinetuneOptions):
    """The base's tokenizer, which SFT data needs (None for the synthetic task)."""
    if options.tiny:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(options.base)


def _datasets(options: FinetuneOptions, base: nn.Module, tokenizer):
    """(train, eval, attention-mask function or None) of the run."""
    if tokenizer is None:
        train, evaluation = counting_datasets(options.seq_length, real_vocab_size(base), options.seed)
        return train, evaluation, None
    train, stats = data.load_sft_samples(options.data, tokenizer, options.seq_length, options.packing)
    lines = [stats.summary()]
    evaluation = None
    if options.eval_data:
        evaluation, eval_stats = data.load_sft_samples(options.eval_data, tokenizer, options.seq_length, options.packing)
        lines.append(eval_stats.summary())
    elif options.eval_fraction is not None:
        train, evaluation = data.split_eval(train, options.eval_fraction, options.seed)
        lines.append(f"--eval-fraction {options.eval_fraction}: {len(evaluation)} samples held out of {stats.samples}")
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
    return train, evaluation, data.packed_attention_mask if options.packing else None


def _held_out_prompts(options: FinetuneOptions, tokenizer) -> list[tuple[list[int], str]]:
    """The first ``--show-answers`` prompts of ``--eval-data`` (none without it, or with PP > 1
    or sequence parallelism, where generation cannot run)."""
    if not options.show_answers or not options.eval_data or options.pp > 1 or options.sequence_parallel:
        return []
    return data.held_out_prompts(options.eval_data, tokenizer, options.show_answers)


def _show_answers(model: nn.Module, tokenizer, eos: list[int], prompts: list[tuple[list[int], str]],
                  when: str) -> None:
    """Greedy answers to ``prompts`` (every rank generates; rank 0 prints them with the references)."""
    if not prompts:
        return
    was_training = model.training
    model.eval()
    answers = [generate(model, ids, 48, eos) for ids, _ in prompts]
    model.train(was_training)
    if dist.get_rank() == 0:
        print(f"held-out answers {when}:", flush=True)
        for (ids, reference), answer in zip(prompts, answers):
            # The prompt's last line of text (a chat template's last line is the assistant's header).
            lines = [line for line in tokenizer.decode(ids, skip_special_tokens=True).splitlines() if line.strip()]
            prompt = lines[-2] if len(lines) > 1 else lines[-1]
            print(f"  {prompt!r}\n    -> {tokenizer.decode(answer, skip_special_tokens=True).strip()!r}"
                  f"  (reference {reference.strip()!r})", flush=True)


def _check_export(model: nn.Module, config: LoraConfig, options: FinetuneOptions) -> None:
    """Refuse before step 1 a ``--export-peft`` the converter would refuse after training:
    expert and router adapters in PEFT's fused layout take no dropout."""
    if options.export_peft and options.moe_layout == "fused" and not _all_ok(not adapts_experts(model)):
        check_target_parameters_config(config, f"--export-peft {options.export_peft} (experts in PEFT's fused layout, "
                                               f"which transformers 5 loads; transformers 4's --moe-layout per-expert takes dropout)")


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([int(ok)], device=torch.cuda.current_device())  # nccl reduces device tensors
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _save_with_fallback(write: Callable[[Path], None], directory: Path) -> Path:
    """``write(directory)`` on every rank; if it fails on any rank, write to a new temporary
    directory instead, say where, and return the directory that holds the adapter."""
    error = None
    try:
        write(directory)
    except OSError as e:
        error = e
    if _all_ok(error is None):
        return directory
    # A plain temporary directory, not an output's temporary sibling: it must outlive this run.
    fallback = Path(from_rank0(lambda: tempfile.mkdtemp(prefix="megatron-lora-adapter-"))) / "adapter"
    write(fallback)
    if dist.get_rank() == 0:
        print(f"could not save the adapter to {directory} ({error or 'failed on another rank'}); "
              f"saved it to {fallback} instead", file=sys.stderr, flush=True)
    return fallback


# -- the job ----------------------------------------------------------------------------------------
class _Progress:
    """tqdm on rank 0 and the ``--log-jsonl`` records (rank 0)."""

    def __init__(self, options: FinetuneOptions, first_step: int):
        self.rank0 = dist.get_rank() == 0
        self.bar = self.log = None
        self.tokens_per_step = options.global_batch_size * options.seq_length
        if not self.rank0:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=options.train_iters, initial=first_step, desc="finetune", unit="step")
        if options.log_jsonl:
            Path(options.log_jsonl).parent.mkdir(parents=True, exist_ok=True)
            self.log = open(options.log_jsonl, "a" if options.load else "w")

    def record(self, entry: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()

    def step(self, step: int, report: StepReport) -> None:
        aux = {} if report.aux_loss is None else {"aux_loss": report.aux_loss}
        self.record({"step": step, "loss": report.loss, **aux, "lr": report.lr, "grad_norm": report.grad_norm,
                     "tokens": report.tokens, "seconds": report.seconds})
        if self.bar is not None:
            aux = {} if report.aux_loss is None else {"aux": f"{report.aux_loss:.4f}"}
            self.bar.set_postfix(loss=f"{report.loss:.4f}", **aux, lr=f"{report.lr:.2e}",
                                 tok_s=f"{self.tokens_per_step / report.seconds:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def finetune(options: FinetuneOptions) -> FinetuneResult:
    """Build, adapt, train, checkpoint and save; call on every rank (rank 0 reports)."""
    check_outputs(options)
    init_distributed(options.tp, options.pp, seed=options.seed, expert_model_parallel_size=options.ep,
                     expert_tensor_parallel_size=options.etp)
    save = Path(options.save)
    scratch = shared_temp_dir(save)
    try:
        if options.base is None:
            if dist.get_rank() == 0:
                write_tiny_base(scratch / "tiny-base", options.seed)
            dist.barrier()
        base_dir = Path(options.base) if options.base is not None else scratch / "tiny-base"
        model = load_base(base_dir, options)
        if options.xlora:
            model = add_xlora(model, base_dir, options, scratch)
        else:
            config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha,
                                lora_dropout=options.lora_dropout, target_modules=options.target_modules,
                                use_dora=options.use_dora, ensure_weight_tying=options.ensure_weight_tying)
            apply_lora(model, config, seed=options.seed)
            _check_export(model, config, options)
        report = trainable_parameters_report(model)  # a collective: every rank calls it
        tokenizer = _tokenizer(options)
        train, evaluation, mask = _datasets(options, base_gpt(model), tokenizer)
        engine = Engine(model, base_gpt(model), options.settings(), train, evaluation, mask)
        if options.load and (latest_checkpoint(options.load) is not None or not _resume_if_any(options)):
            saved = load_checkpoint(engine, options.load)
            for name, value in _data_position_facts(options).items():
                if saved.get(name) != value:
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(f"--load {options.load} was saved with {flag} {saved.get(name)}; "
                                     f"resuming needs the same value (got {value}): the data order depends on it")
        if dist.get_rank() == 0:
            print(report, flush=True)
        prompts = _held_out_prompts(options, tokenizer)
        eos = eos_token_ids(base_dir) if prompts else []
        _show_answers(model, tokenizer, eos, prompts, "before training")
        start, final, losses = _train(engine, options)
        _show_answers(model, tokenizer, eos, prompts, "after training")
        if options.xlora:
            write = lambda directory: save_xlora(model, directory, overwrite=True)  # noqa: E731
        else:
            write = lambda directory: save_adapter(  # noqa: E731
                model, directory, config, overwrite=True, extra={"finetune": asdict(options)})
        adapter = _save_with_fallback(write, save / "adapter")
        if options.export_peft:
            try:
                from_rank0(lambda: convert(adapter, options.export_peft, to="peft", progress=False,
                                           moe_layout=options.moe_layout, expert_names=base_expert_names(base_dir)))
            except Exception as e:  # every rank raises it: the adapter itself is safe
                raise RuntimeError(f"--export-peft {options.export_peft} failed (the adapter is saved in "
                                   f"{adapter}): {e}") from e
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    if dist.get_rank() == 0:
        exported = f"; PEFT export in {options.export_peft}" if options.export_peft else ""
        if start is not None:
            print(f"start loss {start:.4f} -> final loss {final:.4f} "
                  f"(evaluation set, step {engine.step}); adapter saved to {adapter}{exported}", flush=True)
        else:
            trained = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "(no steps left)"
            print(f"training loss {trained} (no evaluation set, step {engine.step}); "
                  f"adapter saved to {adapter}{exported}", flush=True)
    return FinetuneResult(start, final, losses, str(adapter))


def _data_position_facts(options: FinetuneOptions) -> dict:
    """What the samples and their order depend on: a checkpoint records them and a resumed
    run must agree."""
    return {"seed": options.seed, "global_batch_size": options.global_batch_size,
            "seq_length": options.seq_length, "packing": options.packing}


def _train(engine: Engine, options: FinetuneOptions) -> tuple[Optional[float], Optional[float], list[float]]:
    """The training loop with evaluations and checkpoints: (start, final) evaluation losses
    (None without an evaluation set) and the training loss of every step of this run."""
    progress = _Progress(options, engine.step)
    extra = _data_position_facts(options)

    def evaluate(record: bool = True) -> Optional[float]:
        if not engine.eval_data:
            return None
        loss = engine.evaluate()
        if record:
            progress.record({"step": engine.step, "eval_loss": loss})
        return loss

    try:
        start = evaluate(record=engine.step == 0)  # logged at step 0 only: a resumed log continues
        losses = []
        while engine.step < options.train_iters:
            report = engine.train_step()
            losses.append(report.loss)
            progress.step(engine.step, report)
            if engine.step % options.eval_interval == 0 and engine.step < options.train_iters:
                evaluate()
            if options.save_interval and engine.step % options.save_interval == 0 and engine.step < options.train_iters:
                save_checkpoint(engine, options.save, options.keep_checkpoints, extra)
        final = evaluate()
        save_checkpoint(engine, options.save, options.keep_checkpoints, extra)
    finally:
        progress.close()
    return start, final, losses
