"""Caches are caches: a state file that only speeds things up (token budgets, token ids, file digests,
export line index) never stops a run. Unreadable or of the wrong shape, it is discarded with ONE warning
naming the file (it is removed, so the warning is not repeated and the next write starts fresh); the run
goes on as if it were absent. Nothing here blames a model or the user's input."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a malformed cache raises while it is parsed or checked (never an error of the caller's own).
CACHE_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError)


def discard_cache(path: Path, problem: str) -> None:
    """Warn once (naming the file and why), then remove the file."""
    log.warning("%s: %s; discarded (it is a cache, rebuilt as needed)", path, problem)
    with contextlib.suppress(OSError):
        Path(path).unlink()


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_json_cache(path: Path, check: Callable[[Any], T]) -> T | None:
    """The parsed, checked content of a JSON cache file; None when absent, unreadable or of the wrong shape
    (then discarded). `check(data)` returns what the caller keeps and raises (ValueError, TypeError,
    KeyError...) when the shape is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        discard_cache(path, f"not readable JSON ({describe(exc)})")
        return None
    try:
        return check(data)
    except CACHE_ERRORS as exc:
        discard_cache(path, f"not the expected shape ({describe(exc)})")
        return None
