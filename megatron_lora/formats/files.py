"""Reading the JSON and safetensors files of checkpoint directories, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path


import torch
from safetensors import SafetensorError, safe_open


def _check_regular(path: Path) -> None:
    """FileNotFoundError for a missing file, ValueError for a directory, FIFO or device."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")


def read_json(path: str | Path) -> dict:
    """The object in ``path``; FileNotFoundError / ValueError naming the file otherwise."""
    path = Path(path)
    _check_regular(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def open_safetensors(path: str | Path):
    """``safe_open`` a file, turning a missing, corrupt or truncated file into a clear error."""
    path = Path(path)
    _check_regular(path)
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:  # damaged; an OSError (permissions, I/O) stays what it is
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) safetensors file."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
