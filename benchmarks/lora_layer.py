"""Forward+backward time of a LoRA layer over its frozen base layer, next to PEFT's.

For a column- and a row-parallel layer (megatron-core ``ColumnParallelLinear`` /
``RowParallelLinear`` made LoRA layers by ``parallel.lora_layers.add_lora_support``), each
timed against a plain layer holding the same frozen weight. The input requires grad and the
LoRA factors get gradients, as in fine-tuning. Reported next to:

* the FLOP floor: 1 + 6 r (a + b) / (4 m n) for a TP-local base weight [m, n] (forward and
  input gradient: 2 GEMMs) plus the six small LoRA GEMMs on the local A [r, a] and B [b, r];
  at TP=1 this is 1 + 6 r (in + out) / (4 in out);
* PEFT's single-device LoRA (``peft.tuners.lora.Linear`` over an ``nn.Linear``) over its own
  frozen ``nn.Linear``, same shapes, timed in the same interleaved loop.

Then the same layers at TP=2 (2 spawned processes over gloo, one thread each) against the
TP=2 base layer. Each repetition times base, ours (and PEFT's base and PEFT) one after the
other, so slow phases of a shared machine hit all of them; the table shows medians.

    python benchmarks/lora_layer.py            # full run (a few minutes)
    python benchmarks/lora_layer.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

R = 16
SCALING = 2.0


def floor_ratio(w_rows: int, w_cols: int, a_cols: int, b_rows: int, r: int) -> float:
    """FLOP ratio (base + LoRA) / base of forward + input-gradient on one rank."""
    return 1 + 6 * r * (a_cols + b_rows) / (4 * w_rows * w_cols)


def build_layers(kind: str, d_in: int, d_out: int, r: int, seed: int):
    """(base, ours) megatron-core layers of ``kind`` sharing one frozen weight."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_lora.model.gpt import gpt_config
    from megatron_lora.parallel.lora_layers import AdapterSpec, Segment, add_lora_support

    tp = ps.get_tensor_model_parallel_world_size()
    cfg = gpt_config(1, d_in, 8, d_out, tensor_model_parallel_size=tp)
    init = torch.nn.init.xavier_uniform_

    def make():
        torch.manual_seed(seed)
        if kind == "column":
            return ColumnParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=False, gather_output=False)
        return RowParallelLinear(
            d_in, d_out, config=cfg, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=False
        )

    base, ours = make(), make()
    for layer in (base, ours):
        layer.weight.requires_grad_(False)
    width = ours.weight.shape[0]
    add_lora_support(ours).add_adapter(
        "default", AdapterSpec((Segment(name="x", r=r, scaling=SCALING, width=width),), init=False)
    )
    return base, ours


def build_peft(d_in: int, d_out: int, r: int, seed: int):
    """(nn.Linear, PEFT LoRA model over an identical nn.Linear), both frozen bases."""
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out, bias=False)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(seed)
    plain = One()
    plain.requires_grad_(False)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["lin"], init_lora_weights=False)
    peft = get_peft_model(One(), cfg)
    return plain, peft


def fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor, params) -> None:
    x.grad = None
    for p in params:
        p.grad = None
    y = fn(x)
    y.backward(grad)


def time_interleaved(cases: list, reps: int, warmup: int, sync=None) -> list[list[float]]:
    """Milliseconds of each case per repetition, cases run one after the other in each."""
    times = [[] for _ in cases]
    for rep in range(warmup + reps):
        for i, case in enumerate(cases):
            if sync:
                sync()
            t0 = time.perf_counter()
            case()
            dt = (time.perf_counter() - t0) * 1e3
            if rep >= warmup:
                times[i].append(dt)
    return times


def case_for(module, x, grad, megatron: bool):
    params = [p for p in module.parameters() if p.requires_grad]
    fn = (lambda t: module(t)[0]) if megatron else module
    return lambda: fwd_bwd(fn, x, grad, params)


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(tokens, in, out)."""
    if quick:
        return [(256, 256, 256), (256, 256, 512)]
    return [(2048, 2048, 2048), (2048, 2048, 4096)]


def bench_tp1(quick: bool, reps: int, warmup: int) -> list[dict]:
    from megatron_lora import init_distributed

    init_distributed(1)
    torch.set_num_threads(2)
    rows = []
    for tokens, d_in, d_out in shapes(quick):
        plain, peft = build_peft(d_in, d_out, R, seed=0)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, 1, d_in, generator=g, requires_grad=True)
        grad = torch.randn(tokens, 1, d_out, generator=g)
        for kind in ("column", "row"):
            base, ours = build_layers(kind, d_in, d_out, R, seed=0)
            cases = [
                case_for(base, x, grad, True),
                case_for(ours, x, grad, True),
                case_for(plain, x, grad, False),
                case_for(peft, x, grad, False),
            ]
            t_base, t_ours, t_plain, t_peft = map(statistics.median, time_interleaved(cases, reps, warmup))
            rows.append(dict(
                shape=f"{tokens}x{d_in}->{d_out}", layer=f"{kind} TP=1", base=t_base, ours=t_ours,
                floor=floor_ratio(d_out, d_in, d_in, d_out, R), peft=t_peft / t_plain,
            ))
    return rows


def _tp2_rank(rank: int, world: int, port: int, quick: bool, reps: int, warmup: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_lora import init_distributed

    init_distributed(world)
    rows = []
    for tokens, d_in, d_out in shapes(quick):
        g = torch.Generator().manual_seed(1)
        x_full = torch.randn(tokens, 1, d_in, generator=g)
        grad = torch.randn(tokens, 1, d_out, generator=g)
        for kind in ("column", "row"):
            base, ours = build_layers(kind, d_in, d_out, R, seed=0)
            if kind == "column":  # x replicated, output split
                x = x_full.clone().requires_grad_(True)
                gy = grad.chunk(world, -1)[rank].contiguous()
                floor = floor_ratio(d_out // world, d_in, d_in, d_out // world, R)
            else:  # x split, output replicated
                x = x_full.chunk(world, -1)[rank].contiguous().requires_grad_(True)
                gy = grad
                floor = floor_ratio(d_out, d_in // world, d_in // world, d_out, R)
            cases = [case_for(base, x, gy, True), case_for(ours, x, gy, True)]
            t_base, t_ours = map(statistics.median, time_interleaved(cases, reps, warmup, sync=dist.barrier))
            rows.append(dict(
                shape=f"{tokens}x{d_in}->{d_out}", layer=f"{kind} TP=2", base=t_base, ours=t_ours,
                floor=floor, peft=None,
            ))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def bench_tp2(quick: bool, reps: int, warmup: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp2_rank, args=(r, 2, port, quick, reps, warmup, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'shape (tokens x in->out)':<26}{'layer':<12}{'base ms':>9}{'ours ms':>9}{'ratio':>7}{'floor':>7}{'PEFT ratio':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        peft = f"{r['peft']:.3f}" if r["peft"] is not None else "-"
        print(f"{r['shape']:<26}{r['layer']:<12}{r['base']:9.2f}{r['ours']:9.2f}"
              f"{r['ours'] / r['base']:7.3f}{r['floor']:7.3f}{peft:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke run)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 11, quick 7)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-tp2", action="store_true", help="skip the TP=2 measurement")
    args = parser.parse_args()
    reps = args.reps or (7 if args.quick else 11)
    print(f"r={R}, scaling={SCALING}, median of {reps} interleaved repetitions after {args.warmup} warm-up; "
          f"TP=1 on 2 threads, TP=2 on 2 processes x 1 thread (gloo)", flush=True)
    rows = []
    if not args.no_tp2:  # before TP=1: this process's process group would clash with the spawned ranks'
        rows += bench_tp2(args.quick, reps, args.warmup)
    rows = bench_tp1(args.quick, reps, args.warmup) + rows
    print_table(rows)


if __name__ == "__main__":
    main()
