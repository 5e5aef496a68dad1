"""Process-group and RNG set-up for megatron-core, under torchrun or as a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_lora.parallel.cpu import enable_cpu_execution


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """Initialise torch.distributed, megatron-core's parallel_state and its RNG streams.

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
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
