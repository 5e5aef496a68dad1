"""Run a test body on several real ranks (torch.multiprocessing, gloo, CPU megatron-core)."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
import warnings

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, outdir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int = 2, *args):
    """Run ``fn(rank, world, *args)`` on ``world`` processes; return the per-rank results.

    ``fn`` must be a module-level function; its return value must be made of tensors and
    plain Python values. A failure on any rank re-raises with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.start_processes(_entry, args=(world, _free_port(), fn, args, outdir), nprocs=world,
                               start_method="spawn")
        except Exception:
            pass
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result")
            out = torch.load(path, weights_only=True)
            if not out["ok"]:
                raise AssertionError(f"rank {r} failed:\n{out['error']}")
            results.append(out["result"])
        return results
