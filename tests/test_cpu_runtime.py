"""parallel.cpu's training-engine support: the CUDA-on-CPU function mode, gradient
clipping, the bf16/fp16 optimizer wrapper and the distributed optimizer on gloo ranks."""


import torch

from dist import run_ranks


def _tiny_lora_model(base_dir, dtype=torch.float32):
    from megatron_lora.config import LoraConfig
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.model.lora import apply_lora

    model, _ = load_hf_base(base_dir, dtype)
    return apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                        init_lora_weights=False), seed=1)


def _step_with(base_dir, dtype, distributed):
    """One optimizer step of megatron-core's engine; the trainable parameters after it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_lora.runtime.engine import token_losses
    from megatron_lora.parallel.cpu import cuda_on_cpu

    model = _tiny_lora_model(base_dir, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.train()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed)
    with cuda_on_cpu():
        ddp = DistributedDataParallel(model.config, ddp_config, module=model)
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=1e-3, bf16=dtype == "bf16",
            params_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
            use_distributed_optimizer=distributed), [ddp])
    gen = torch.Generator().manual_seed(torch.distributed.get_rank())
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    logits = ddp(ids[:, :-1], torch.arange(8).unsqueeze(0), None)
    token_losses(model, logits, ids[:, 1:]).mean().backward()
    with cuda_on_cpu():
        ddp.finish_grad_sync()
        updated, norm, _ = opt.step()
    wrapper = type(opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt).__name__
    return {"updated": updated, "norm": norm, "wrapper": wrapper,
            "params": [p.detach().clone() for p in model.parameters() if p.requires_grad]}


def _body(rank, world, base_dir):
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.parallel.cpu import CudaOnCpu, cuda_on_cpu

    init_distributed(1, seed=1)
    out = {}
    with cuda_on_cpu() as mode:
        out["mode"] = isinstance(mode, CudaOnCpu)
        x = torch.ones(3)
        out["zeros"] = torch.zeros(2, device="cuda").device.type
        out["cuda"] = x.cuda() is x and x.to("cuda").device.type == "cpu"
        out["type"] = (x.type(), x.half().type(), x.type(torch.float64).dtype)
        # clipping: megatron-core's fp32 clip on CPU grads
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), 3.0)
        norm = get_grad_norm_fp32([p.grad], grad_stats_parallel_group=ps.get_model_parallel_group())
        clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=norm)
        out["clip"] = (norm, p.grad.norm().item())
    out["after"] = torch.ones(1).type()  # the mode is gone outside
    # the non-distributed and the distributed optimizer (fp32), and the bf16 wrapper
    out["plain"] = _step_with(base_dir, "fp32", False)
    out["distributed"] = _step_with(base_dir, "fp32", True)
    out["bf16"] = _step_with(base_dir, "bf16", False)
    return out


def test_engine_pieces_on_cpu(tmp_path):
    from megatron_lora.runtime.tiny_task import write_tiny_base

    write_tiny_base(tmp_path / "base", 1)
    got = run_ranks(_body, 2, str(tmp_path / "base"))
    r = got[0]
    assert r["mode"] and r["zeros"] == "cpu" and r["cuda"]
    assert r["type"] == ("torch.cuda.FloatTensor", "torch.cuda.HalfTensor", torch.float64)
    assert abs(r["clip"][0] - 6.0) < 1e-6 and abs(r["clip"][1] - 1.0) < 1e-5
    assert r["after"] == "torch.FloatTensor"
    plain, dist_opt, bf16 = r["plain"], r["distributed"], r["bf16"]
    assert plain["updated"] and dist_opt["updated"] and bf16["updated"]
    assert dist_opt["wrapper"] == "DistributedOptimizer" and bf16["wrapper"] == "Float16OptimizerWithFloat16Params"
    assert abs(plain["norm"] - dist_opt["norm"]) <= 1e-5 * plain["norm"]
    for a, b in zip(plain["params"], dist_opt["params"]):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max().item())
    # both ranks hold the same (data-parallel) adapter after the step
    for a, b in zip(got[0]["distributed"]["params"], got[1]["distributed"]["params"]):
        assert torch.equal(a, b)
    # bf16 base: the fp32 adapters are stepped in place (no second master copy)
    assert all(p.dtype == torch.float32 for p in bf16["params"])
    assert abs(bf16["norm"] - plain["norm"]) < 0.05 * plain["norm"]
