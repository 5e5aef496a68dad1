"""The main job (scripts/finetune.py) end to end under torchrun at TP=2."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]
LOSSES = re.compile(r"start loss ([0-9.]+) -> final loss ([0-9.]+)")


def _finetune(*args: str) -> tuple[float, float]:
    """Run the job on 2 ranks; return its printed (start loss, final loss)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "finetune.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = LOSSES.findall(proc.stdout)
    assert len(found) == 1, proc.stdout[-2000:]  # printed once, by rank 0
    return float(found[0][0]), float(found[0][1])


def _reload_body(rank, world, out, seed):
    """A fresh TP=1 process: rebuild the base, load the TP=2 adapter, evaluate it."""
    from megatron_lora import load_adapter
    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.runtime.training import RANDOM_VOCAB, FinetuneOptions, build_base, counting_batch, lm_loss

    options = FinetuneOptions(tp=1, seed=seed)
    init_distributed(1, seed=seed)
    model = build_base(options)
    config = load_adapter(model, out)
    model.eval()
    held_out = counting_batch(-1, options.batch_size, options.seq_len, RANDOM_VOCAB, seed)
    with torch.no_grad():
        loss = lm_loss(model, held_out).item()
    b_norms = {n: p.abs().max().item() for n, p in model.named_parameters() if ".lora_B." in n}
    return {"loss": loss, "b_norms": b_norms, "r": config.r}


def test_finetune_trains_saves_and_reloads_at_tp1(tmp_path):
    out = tmp_path / "adapter"
    start, final = _finetune("--steps", "20", "--out", str(out), "--seed", "3")
    assert final < start - 0.3, (start, final)  # the adapters learned something
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "tp_rank_00.safetensors",
                                                     "tp_rank_01.safetensors"]
    got = run_ranks(_reload_body, 1, str(out), 3)[0]
    # 4 layers x 7 projections, every B trained away from its zero init
    assert len(got["b_norms"]) == 28 and min(got["b_norms"].values()) > 0, got["b_norms"]
    assert got["r"] == 8
    # the TP=2 adapter resharded to TP=1 reproduces the loss the job printed after training
    assert abs(got["loss"] - final) < 2e-4, (got["loss"], final)


def test_finetune_hf_base_with_padded_vocab(tmp_path):
    """--base: an HF Llama with 131 tokens (padded to 132 at TP=2). The start loss (B = 0)
    must be HF's own loss on the same batch: padding columns take no probability."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lora.runtime.training import FinetuneOptions, counting_batch

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    # Its logits are small (HF's init): a padding logit of 0 would add ~0.0075 to the loss.
    hf.save_pretrained(tmp_path / "hf")
    start, final = _finetune("--base", str(tmp_path / "hf"), "--steps", "8", "--seq-len", "16",
                             "--out", str(tmp_path / "adapter"), "--seed", "5", "--lr", "1e-2")
    d = FinetuneOptions()
    ids = counting_batch(-1, d.batch_size, 16, 131, 5)
    with torch.no_grad():
        logits = hf(ids[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 131), ids[:, 1:].reshape(-1)).item()
    assert abs(start - expected) < 2e-4 * max(1.0, expected), (start, expected)
    assert final < start, (start, final)
