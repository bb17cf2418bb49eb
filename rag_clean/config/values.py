"""The one strict parser of setting values, from the environment, a .env file, a config file or run config.

Booleans are true/false, 1/0, yes/no, on/off (any case) and nothing else, so RAG_CLEAN_TOKEN_CACHE=false
means off and a typo is an error, not "on". Every error is one line naming where the value came from and
the value itself: `RAG_CLEAN_GIL_SWITCH_MS='abc': not a number`.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

from rag_clean.config.declaration import Setting

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting is unknown or has a value it cannot take; the message names the source and the key."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_value(setting: Setting, raw: Any, where: str) -> Any:
    """`raw` as `setting`'s type, or SettingsError "<where>=<raw>: <what is wrong>".

    Strings (environment, .env) and typed values (TOML / JSON / run config) go through the same rules.
    For optional settings an empty string means "not given" (None).
    """
    try:
        return _convert(setting, raw)
    except ValueError as exc:
        raise SettingsError(f"{where}={raw!r}: {exc}") from None


def _convert(s: Setting, raw: Any) -> Any:
    if raw is None or (s.optional and isinstance(raw, str) and not raw.strip()):
        if s.optional:
            return None
        raise ValueError("a value is required")
    kind = s.kind
    if kind == "bool":
        return _bool(raw)
    if kind in ("int", "float"):
        value = _number(raw, whole=kind == "int")
        _check_range(s, value)
    elif kind == "int_list":
        items = raw.split(",") if isinstance(raw, str) else _sequence(raw)
        value = tuple(_number(i, whole=True, what="device indices like '0,1'") for i in items
                      if not (isinstance(i, str) and not i.strip()))
    elif kind == "list":
        items = raw.split(",") if isinstance(raw, str) else _sequence(raw)
        if not all(isinstance(i, str) for i in items):
            raise ValueError("not a list of names")
        value = tuple(i.strip() for i in items if i.strip())
    else:
        if not isinstance(raw, str):
            raise ValueError("not a string")
        value = raw.strip()
        if kind == "choice" and value not in s.choices:
            raise ValueError("not one of " + ", ".join(repr(c) for c in s.choices if c)
                             + (" (or empty)" if "" in s.choices else ""))
    problem = s.check(value) if s.check else None
    if problem:
        raise ValueError(problem)
    return value


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):  # JSON 0 / 1
        return bool(raw)
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError("not a boolean (true/false, 1/0, yes/no, on/off)")


def _number(raw: Any, *, whole: bool, what: str = "") -> int | float:
    what = what or ("a whole number" if whole else "a number")
    if isinstance(raw, bool):
        raise ValueError(f"not {what}")
    if isinstance(raw, str):
        try:
            raw = int(raw.strip()) if whole else float(raw.strip())
        except ValueError:
            raise ValueError(f"not {what}") from None
    if not isinstance(raw, (int, float)) or (isinstance(raw, float) and not math.isfinite(raw)):
        raise ValueError(f"not {what}")
    if whole:
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"not {what}")
        return int(raw)
    return float(raw)


def _sequence(raw: Any) -> list:
    if not isinstance(raw, (list, tuple)):
        raise ValueError("not a list (a comma-separated string or an array)")
    return list(raw)


def _check_range(s: Setting, value: float) -> None:
    low_ok = s.low is None or (value > s.low if s.open_low else value >= s.low)
    high_ok = s.high is None or (value < s.high if s.open_high else value <= s.high)
    if low_ok and high_ok:
        return
    if s.high is None:
        raise ValueError(f"must be {'>' if s.open_low else '>='} {s.low}")
    raise ValueError(f"must be in {'(' if s.open_low else '['}{s.low}, {s.high}{')' if s.open_high else ']'}")
