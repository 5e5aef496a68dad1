"""Reading the JSON files of checkpoint directories, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path) -> dict:
    """The object in ``path``; FileNotFoundError / ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def json_field(path: str | Path, key: str) -> Any:
    """``key`` of the object in ``path``, or None if the file is absent or unreadable (detection)."""
    try:
        return read_json(path).get(key)
    except (FileNotFoundError, ValueError):
        return None
