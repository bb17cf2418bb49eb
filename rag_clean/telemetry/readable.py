"""Readable renderings for Dagster metadata: sizes, counts, rates, durations, markdown tables.

The numbers stay in the metadata beside these; the text is for people reading the UI.
"""

from __future__ import annotations

from typing import Any


def human_bytes(n: int | float) -> str:
    """1536 -> "1.5 KiB" (binary units, one decimal; bytes as an integer)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(x: int | float) -> str:
    """230_400 -> "230k", 1_500_000 -> "1.5M", 12.34 -> "12.3"."""
    x = float(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.0f}{suffix}" if v >= 100 else f"{v:.1f}{suffix}".replace(".0" + suffix, suffix)
    return f"{x:.0f}" if x >= 100 or x == int(x) else f"{x:.1f}"


def human_rate(per_second: float, unit: str) -> str:
    return f"{human_count(per_second)} {unit}/s"


def human_duration(seconds: float) -> str:
    """0.0123 -> "12 ms", 4.2 -> "4.2 s", 185 -> "3 min 5 s", 7300 -> "2 h 1 min"."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def compact(value: Any) -> Any:
    """`value` without None, empty strings, lists and dicts, at any depth (False and 0 are values: kept)."""
    if isinstance(value, dict):
        out = {k: compact(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if not _empty(v)}
    if isinstance(value, (list, tuple)):
        return [v for v in (compact(v) for v in value) if not _empty(v)]
    return value


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


METRIC_COLUMNS = (("recall@1", "recall@1"), ("recall@5", "recall@5"), ("recall@10", "recall@10"),
                  ("recall@20", "recall@20"), ("mrr", "MRR"), ("mrr@10", "MRR@10"), ("ndcg@10", "nDCG@10"))


def _phases(metrics: dict[str, dict]) -> list[tuple[str, dict]]:
    """(column label, values) per phase: before / after rerank on all queries, then on the held-out split."""
    short = {"before_rerank": "before", "after_rerank": "after"}
    phases = [(short.get(p, p), v) for p, v in metrics.items() if p != "heldout"]
    return phases + [(f"held-out {short.get(p, p)}", v) for p, v in (metrics.get("heldout") or {}).items()]


def metrics_text(metrics: dict[str, dict]) -> list[str]:
    """The retrieval metrics as a small aligned table for a terminal: a phase per row, a metric per column
    (a header and two to four rows, under 90 characters wide)."""
    phases = _phases(metrics)
    if not phases:
        return []
    rows = [["phase", *(label for _, label in METRIC_COLUMNS)]]
    rows += [[label, *("n/a" if v.get(key) is None else f"{v[key]:.3f}" for key, _ in METRIC_COLUMNS)]
             for label, v in phases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def metrics_markdown(metrics: dict[str, dict], candidate_sources: list[str], scorer: str) -> str:
    """One row per metric, one column per phase (before / after rerank, then held-out): few, narrow columns,
    so the table fits the UI's metadata column; then what was ranked, and how."""
    phases = _phases(metrics)
    lines = ["| metric | " + " | ".join(label for label, _ in phases) + " |", "|---|" + "---:|" * len(phases)]
    for key, label in METRIC_COLUMNS:
        cells = [("n/a" if values.get(key) is None else f"{values[key]:.3f}") for _, values in phases]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Candidate sources: " + (", ".join(f"`{s}`" for s in candidate_sources) or "none"),
              "", f"Final order by: `{scorer}`"]
    return "\n".join(lines)
