"""Training checkpoints: ``SAVE/iter_{k:07d}/`` and ``SAVE/latest`` (the newest one's name).

An iteration directory holds, without pickle:

    trainer.json                        step, data position, layout, scheduler, Adam step, loss scale
    state_tp{t:02d}_pp{p:02d}.safetensors  trainable parameters of that TP rank / pipeline stage
                                        (``param.NAME``) and their Adam moments (``exp_avg.NAME``,
                                        ``exp_avg_sq.NAME``), written by the first data-parallel replica
    state_etp{t:02d}_ep{e:02d}_pp{p:02d}.safetensors
                                        the same for trainable expert parameters (mixtures of experts;
                                        local expert names) of that expert-TP rank / expert-parallel
                                        rank / stage, written by the first expert data-parallel replica
    rng/rank_{r:05d}.safetensors        each rank's CPU (and CUDA) and model-parallel RNG states

It appears atomically (``formats.outputs``: written in a temporary sibling, then renamed),
``latest`` is replaced atomically after it, and only the newest ``keep`` iteration directories stay. Resuming needs
the same TP and PP sizes; the data-parallel size may differ (the optimizer is not sharded
over data parallelism, and the data order depends only on the step). RNG states are restored
only at the same layout (they drive dropout alone). Trainable expert parameters need the same
expert-parallel and expert-TP sizes too.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from safetensors.torch import load_file, save_file

from megatron_lora.formats.outputs import TMP_TAG, atomic_file, shared_atomic_directory
from megatron_lora.hf.layout import is_expert_parameter
from megatron_lora.runtime.engine import Engine, _torch_optimizers

LATEST = "latest"
TRAINER = "trainer.json"
_ITER = re.compile(r"iter_(\d{7})$")
#: What else a --save directory may hold: the final adapter and our temporary directories.
_OURS = re.compile(rf"(iter_\d{{7}}|{LATEST}|adapter|\..*\.{TMP_TAG}\..*)$")


def iteration_dir(save: str | Path, step: int) -> Path:
    return Path(save) / f"iter_{step:07d}"


def iterations(save: str | Path) -> list[int]:
    save = Path(save)
    if not save.is_dir():
        return []
    return sorted(int(m[1]) for p in save.iterdir() if (m := _ITER.match(p.name)) and p.is_dir())


def latest_checkpoint(directory: str | Path) -> Optional[Path]:
    """The iteration directory ``directory/latest`` names, or None without one."""
    latest = Path(directory) / LATEST
    if not latest.is_file():
        return None
    path = Path(directory) / latest.read_text().strip()
    if not (path / TRAINER).is_file():
        raise ValueError(f"{latest} names {path.name}, which is not a complete checkpoint")
    return path


def check_save_dir(save: str | Path) -> None:
    """Refuse a ``--save`` that exists but is not a directory of our checkpoints."""
    save = Path(save)
    if not save.exists():
        return
    if not save.is_dir():
        raise ValueError(f"--save {save} exists and is not a directory")
    foreign = sorted(p.name for p in save.iterdir() if not _OURS.match(p.name))
    if foreign:
        raise ValueError(f"--save {save} exists and holds files that are not our checkpoints "
                         f"({', '.join(foreign[:3])}); choose a new or empty directory")


def _state_file(directory: Path, tp: int, pp: int) -> Path:
    return directory / f"state_tp{tp:02d}_pp{pp:02d}.safetensors"


def _expert_state_file(directory: Path) -> Path:
    """This rank's file of expert parameters."""
    etp, ep = ps.get_expert_tensor_parallel_rank(), ps.get_expert_model_parallel_rank()
    return directory / f"state_etp{etp:02d}_ep{ep:02d}_pp{ps.get_pipeline_model_parallel_rank():02d}.safetensors"


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank_{rank:05d}.safetensors"


def _trainable(engine: Engine) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in engine.model.module.named_parameters() if p.requires_grad}


def save_checkpoint(engine: Engine, save: str | Path, keep: int, extra: dict) -> Path:
    """Write ``SAVE/iter_{engine.step:07d}``; call on every rank. ``extra`` goes to trainer.json."""
    save = Path(save)
    final = iteration_dir(save, engine.step)
    rank = dist.get_rank()
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    states = {}
    for opt in _torch_optimizers(engine.optimizer):
        states.update(opt.state)
    trainable = _trainable(engine)
    # An iteration directory under --save is ours (check_save_dir), so it may be replaced.
    with shared_atomic_directory(final, overwrite=True) as tmp:
        if ps.get_data_parallel_rank() == 0:
            dense = {n: p for n, p in trainable.items() if not is_expert_parameter(n)}
            save_file(_state_tensors(dense, states), str(_state_file(tmp, tp, pp)))
        experts = {n: p for n, p in trainable.items() if is_expert_parameter(n)}
        if experts and ps.get_expert_data_parallel_rank() == 0:
            save_file(_state_tensors(experts, states), str(_expert_state_file(tmp)))
        (tmp / "rng").mkdir(exist_ok=True)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        rng.update({f"tracker.{k}": v.cpu() for k, v in get_cuda_rng_tracker().get_states().items()})
        save_file(rng, str(_rng_file(tmp, rank)))
        if rank == 0:
            (tmp / TRAINER).write_text(json.dumps(_trainer_state(engine, extra), indent=2, sort_keys=True) + "\n")
    if rank == 0:
        with atomic_file(save / LATEST) as latest:
            latest.write_text(final.name + "\n")
        for old in iterations(save)[:-keep] if keep > 0 else []:
            if old != engine.step:
                shutil.rmtree(iteration_dir(save, old), ignore_errors=True)
    dist.barrier()
    return final


def _state_tensors(params: dict[str, torch.nn.Parameter], states: dict) -> dict[str, torch.Tensor]:
    """``param.NAME`` and the Adam moments of ``params``, on the CPU."""
    tensors = {}
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach().cpu()
        for moment in ("exp_avg", "exp_avg_sq"):
            if p in states:
                tensors[f"{moment}.{name}"] = states[p][moment].cpu()
    return {k: v.contiguous() for k, v in tensors.items()}


def _trainer_state(engine: Engine, extra: dict) -> dict:
    step_counts = {int(s["step"]) for opt in _torch_optimizers(engine.optimizer) for s in opt.state.values()}
    scaler = _grad_scaler(engine)
    return {
        "step": engine.step,
        "consumed_samples": engine.step * engine.settings.global_batch_size,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "dp": engine.dp,
        "world": dist.get_world_size(),
        "scheduler": engine.scheduler.state_dict(),
        "adam_step": max(step_counts) if step_counts else 0,
        "loss_scale": None if scaler is None else float(scaler.scale.item()),
        **extra,
    }


def _grad_scaler(engine: Engine):
    """The fp16 loss scaler of the (possibly chained) optimizer wrapper, or None."""
    chained = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
    return getattr(chained[0], "grad_scaler", None)


def load_checkpoint(engine: Engine, directory: str | Path) -> dict:
    """Restore the newest checkpoint of ``directory`` into ``engine``; return its trainer.json."""
    path = latest_checkpoint(directory)
    if path is None:
        raise ValueError(f"--load {directory} holds no checkpoint ({LATEST} is missing)")
    trainer = json.loads((path / TRAINER).read_text())
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (trainer["tp"], trainer["pp"]) != (tp, pp):
        raise ValueError(f"--load {path} was saved at TP={trainer['tp']} PP={trainer['pp']}; "
                         f"resume it at the same sizes (this run: TP={tp} PP={pp}; the DP size may differ)")
    trainable = _trainable(engine)
    tensors = load_file(str(_state_file(path, ps.get_tensor_model_parallel_rank(),
                                        ps.get_pipeline_model_parallel_rank())))
    if any(is_expert_parameter(n) for n in trainable):
        ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
        if (trainer.get("ep", 1), trainer.get("etp", trainer["tp"])) != (ep, etp):
            raise ValueError(f"--load {path} was saved at expert-parallel size {trainer.get('ep', 1)} and expert-TP "
                             f"{trainer.get('etp', trainer['tp'])}; resume its trainable experts at the same sizes "
                             f"(this run: {ep} and {etp})")
        tensors.update(load_file(str(_expert_state_file(path))))
    optimizers = _torch_optimizers(engine.optimizer)
    owner = {p: opt for opt in optimizers for g in opt.param_groups for p in g["params"]}
    step = torch.tensor(float(trainer["adam_step"]))
    for name, p in trainable.items():
        if f"param.{name}" not in tensors:
            raise ValueError(f"--load {path}: no saved value for {name}")
        with torch.no_grad():
            p.copy_(tensors[f"param.{name}"])
        if f"exp_avg.{name}" in tensors and p in owner:
            owner[p].state[p] = {"step": step.clone(),
                                 "exp_avg": tensors[f"exp_avg.{name}"].to(p.device),
                                 "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device)}
    engine.scheduler.load_state_dict(trainer["scheduler"])
    if trainer["loss_scale"] is not None and _grad_scaler(engine) is not None:
        _grad_scaler(engine)._scale.fill_(trainer["loss_scale"])
    engine.step = trainer["step"]
    if trainer["world"] == dist.get_world_size():
        rng = load_file(str(_rng_file(path, dist.get_rank())))
        torch.set_rng_state(rng.pop("cpu"))
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng.pop("cuda"))
        get_cuda_rng_tracker().set_states({k[len("tracker."):]: v for k, v in rng.items()})
    return trainer
