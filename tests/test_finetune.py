"""The main job (scripts/finetune.py) end to end under torchrun on 2 ranks."""

import json
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
    """Run the job on 2 ranks; return its printed (start loss, final loss) on the evaluation set."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "finetune.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = LOSSES.findall(proc.stdout)
    assert len(found) == 1, proc.stdout[-2000:]  # printed once, by rank 0
    return float(found[0][0]), float(found[0][1])


def _reload_body(rank, world, save, base, seed):
    """A fresh TP=1 process: the same tiny base, the TP=2 adapter; its evaluation loss and
    the logits of one evaluation sample."""
    from megatron_lora import load_adapter
    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.runtime.engine import Engine
    from megatron_lora.runtime.tiny_task import counting_datasets
    from megatron_lora.runtime.training import FinetuneOptions, load_base

    options = FinetuneOptions(tiny=True, seed=seed, seq_length=16, eval_iters=None)
    init_distributed(1, seed=seed)
    model = load_base(base, options)
    config = load_adapter(model, Path(save) / "adapter")
    train, evaluation = counting_datasets(16, 256, seed)
    loss = Engine(model, model, options.settings(), train, evaluation).evaluate()
    b_norms = {n: p.abs().max().item() for n, p in model.named_parameters() if ".lora_B." in n}
    ids = evaluation[0]["tokens"].unsqueeze(0)
    model.eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(16).unsqueeze(0), None)
    return {"loss": loss, "b_norms": b_norms, "r": config.r, "ids": ids, "logits": logits}


def test_finetune_trains_checkpoints_exports_and_reloads_at_tp1(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_lora.runtime.tiny_task import write_tiny_base

    save, peft_dir, log = tmp_path / "run", tmp_path / "peft", tmp_path / "log.jsonl"
    start, final = _finetune("--tiny", "--tp", "2", "--steps", "20", "--seq-length", "16", "--save", str(save),
                             "--seed", "3", "--save-interval", "5", "--eval-interval", "10",
                             "--export-peft", str(peft_dir), "--log-jsonl", str(log))
    assert final < start - 0.3, (start, final)  # the adapters learned something
    assert sorted(p.name for p in save.iterdir()) == ["adapter", "iter_0000015", "iter_0000020", "latest"]
    assert (save / "latest").read_text().strip() == "iter_0000020"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert set(steps[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "seconds"}
    assert all(r["tokens"] == 16 * 12 for r in steps)  # 16 sequences x 12 loss tokens (4 are prompt)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert abs(evals[0]["eval_loss"] - start) < 1e-4 and abs(evals[-1]["eval_loss"] - final) < 1e-4

    write_tiny_base(tmp_path / "base", 3)  # the same random base the job made
    got = run_ranks(_reload_body, 1, str(save), str(tmp_path / "base"), 3)[0]
    # 4 layers x 7 projections, every B trained away from its zero init
    assert len(got["b_norms"]) == 28 and min(got["b_norms"].values()) > 0, got["b_norms"]
    assert got["r"] == 8
    # the TP=2 adapter resharded to TP=1 reproduces the evaluation loss the job printed
    assert abs(got["loss"] - final) < 2e-4, (got["loss"], final)
    # --export-peft: PEFT on the HF base gives our logits
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, peft_dir).eval()
    with torch.no_grad():
        theirs = peft(got["ids"]).logits
    scale = theirs.abs().max().item()
    assert (theirs - got["logits"]).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_finetune_hf_base_with_padded_vocab(tmp_path):
    """--tiny --base: an HF Llama with 131 tokens (padded to 132 at TP=2). The start loss
    (B = 0) must be HF's own loss on the evaluation set: padding columns take no probability."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lora.runtime.tiny_task import counting_datasets

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    # Its logits are small (HF's init): a padding logit of 0 would add ~0.0075 to the loss.
    hf.save_pretrained(tmp_path / "hf")
    start, final = _finetune("--tiny", "--base", str(tmp_path / "hf"), "--tp", "2", "--steps", "8",
                             "--seq-length", "16", "--save", str(tmp_path / "run"), "--seed", "5", "--lr", "1e-2")
    _, evaluation = counting_datasets(16, 131, 5)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(len(evaluation)):
            s = evaluation[i]
            logits = hf(s["tokens"].unsqueeze(0)).logits[0]
            ce = torch.nn.functional.cross_entropy(logits, s["labels"], reduction="none")
            total += (ce * s["loss_mask"]).sum().item()
            count += s["loss_mask"].sum().item()
    expected = total / count
    assert abs(start - expected) < 2e-4 * max(1.0, expected), (start, expected)
    assert final < start, (start, final)
