"""Peak anonymous memory of each rank while importing a ~0.5B HF model at TP=2.

Writes a synthetic Qwen2.5-0.5B-shaped checkpoint (random fp32 weights, sharded with an
index) once into a temporary directory, then imports it with ``load_hf_base`` under
``torchrun --nproc_per_node=2``. Each rank samples its RssAnon every 2 ms and compares the
peak with its fp32 share of the weights. Target: peak <= 0.6 GB + 1.25 x share (loading the
whole checkpoint on every rank cannot meet it).

    python benchmarks/base_import.py [--layers 24] [--tp 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert import PeakSampler, rss_anon  # noqa: E402  (the RssAnon sampler of benchmarks/convert.py)

QWEN25_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
GB = 1e9


def write_checkpoint(directory: Path, layers: int) -> int:
    """Random Qwen2 weights, one shard per layer (+ embedding, norm); returns the parameter count."""
    cfg = dict(QWEN25_05B, num_hidden_layers=layers)
    (directory / "config.json").write_text(json.dumps(cfg))
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shards = {"model-emb.safetensors": {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}}
    for i in range(layers):
        p = f"model.layers.{i}."
        shards[f"model-{i:03d}.safetensors"] = {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        }
    weight_map, count = {}, 0
    for fname, shapes in shards.items():
        tensors = {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
        save_file(tensors, str(directory / fname))
        weight_map.update({k: fname for k in tensors})
        count += sum(t.numel() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return count


def worker(directory: str, tp: int, report: str) -> None:
    """One rank: import under the sampler, write this rank's figures as JSON."""
    from megatron_lora import init_distributed
    from megatron_lora.hf.importer import load_hf_base

    init_distributed(tp)
    rank = torch.distributed.get_rank()
    before = rss_anon()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        model, _ = load_hf_base(directory)
    seconds = time.perf_counter() - start
    share = sum(p.numel() * 4 for p in model.parameters())
    Path(f"{report}.{rank}").write_text(json.dumps(
        dict(rank=rank, before=before, peak=sampler.peak, share=share, seconds=seconds)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.tp, a.report)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        ckpt.mkdir()
        t = time.perf_counter()
        count = write_checkpoint(ckpt, a.layers)
        print(f"synthetic Qwen2 checkpoint: {count / 1e6:.0f}M parameters, {count * 4 / GB:.2f} GB fp32 "
              f"(written in {time.perf_counter() - t:.0f} s)")
        report = str(Path(tmp) / "report")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.tp}",
               __file__, "--worker", str(ckpt), "--tp", str(a.tp), "--report", report]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        rows = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(a.tp)]
    print(f"{'rank':>4} {'share GB':>9} {'RssAnon before':>15} {'peak GB':>8} {'target GB':>10} "
          f"{'peak/share':>10} {'load s':>7}")
    ok = True
    for r in rows:
        target = 0.6 * GB + 1.25 * r["share"]
        ok &= r["peak"] <= target
        print(f"{r['rank']:>4} {r['share'] / GB:>9.3f} {r['before'] / GB:>15.3f} {r['peak'] / GB:>8.3f} "
              f"{target / GB:>10.3f} {r['peak'] / r['share']:>10.2f} {r['seconds']:>7.1f}")
    print(f"target peak <= 0.6 GB + 1.25 x share: {'met' if ok else 'MISSED'} "
          f"(the whole checkpoint is {count * 4 / GB:.2f} GB)")


if __name__ == "__main__":
    main()
