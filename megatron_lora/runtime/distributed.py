"""Process-group and RNG set-up for megatron-core, under torchrun or as a single process."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_lora.parallel.cpu import define_mla_names_without_te, define_moe_names_without_te, enable_cpu_execution


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
) -> None:
    """Initialise torch.distributed, megatron-core's parallel_state and its RNG streams.

    Mixture-of-experts layers split their experts over ``expert_model_parallel_size`` ranks
    (EP) and each expert's weights over ``expert_tensor_parallel_size`` ranks (expert TP;
    megatron-core's default, None, is the dense TP size). As in megatron-core, the experts
    form their own grid over the same world: ETP x EP x PP must divide the world size just as
    TP x PP does (e.g. TP=2 x EP=2 on 4 ranks: dense data parallel 2, expert data parallel 1).

    Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) and as a plain
    process (world size 1). Uses nccl with CUDA and gloo without; without CUDA, megatron-core
    is switched to CPU execution (``megatron_lora.parallel.cpu``).
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        enable_cpu_execution()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * pipeline_model_parallel_size):
        raise ValueError(
            f"tensor_model_parallel_size={tensor_model_parallel_size} x "
            f"pipeline_model_parallel_size={pipeline_model_parallel_size} does not divide "
            f"the world size {world}"
        )
    etp = expert_tensor_parallel_size or tensor_model_parallel_size
    if world % (etp * expert_model_parallel_size * pipeline_model_parallel_size):
        raise ValueError(
            f"expert_tensor_parallel_size={etp} x expert_model_parallel_size="
            f"{expert_model_parallel_size} x pipeline_model_parallel_size="
            f"{pipeline_model_parallel_size} does not divide the world size {world}"
        )
    define_moe_names_without_te()
    define_mla_names_without_te()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=etp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
