"""Bad input versus bugs: the errors entry points report in one line, and the shared checks.

Bad input (a missing or damaged file, a flag out of range, an unwritable output, an
optional package not installed) raises one of :data:`INPUT_ERRORS` with a message that
names the file or flag; ``cli.run_entry`` prints it as one line. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class MissingDependency(ImportError):
    """An optional package that a feature needs is not installed."""


#: Exceptions that mean bad input or environment, not a bug.
INPUT_ERRORS = (ValueError, OSError, MissingDependency)


def require(module: str, feature: str, install: str) -> ModuleType:
    """Import ``module`` for ``feature``, or say in one line what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken: a bug's traceback helps
        raise MissingDependency(f"{feature} needs {module} ({install})") from None


def check_positive_int(what: str, value: Any) -> None:
    """Refuse anything but a positive integer (``what`` names the flag or field)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
