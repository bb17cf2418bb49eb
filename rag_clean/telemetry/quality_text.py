"""What a summary says about retrieval quality, as lines for people (the rag-clean CLI prints them).

Every figure is labelled with the queries it was measured on (all queries or the held-out split), the
weights say whether they were tuned or the default was kept and why, and the held-out gain of the choice
over the default comes with its interval: a number without those is easy to misread.
"""

from __future__ import annotations

from rag_clean.telemetry.readable import metrics_text

SHOWN = (("recall@10", "R@10"), ("mrr@10", "MRR@10"), ("ndcg@10", "nDCG@10"))


def _figures(values: dict | None) -> str:
    values = values or {}
    return " ".join(f"{label} {values[key]:.3f}" for key, label in SHOWN if values.get(key) is not None) or "n/a"


def _weights(weights: dict) -> str:
    return ", ".join(f"{name} {w:.2f}" for name, w in weights.items())


def _choice_lines(label: str, tuning: dict) -> list[str]:
    split = tuning.get("split") or {}
    why = "tuned" if tuning.get("tuned") else "default kept"
    lines = [f"{label}: {_weights(tuning['weights'])} ({why}; split {split.get('tune', 0)} tune / "
             f"{split.get('heldout', 0)} held-out queries)", f"   why: {tuning.get('reason', '')}"]
    gain = tuning.get("heldout_gain") or {}
    if gain.get("queries"):
        lo, hi = gain["interval"]
        lines.append(f"   held-out gain vs the default ({_weights(tuning.get('default_weights') or {})}): "
                     f"{gain['gain']:+.3f} MRR@10, {gain.get('level', 0.95):.0%} interval [{lo:+.3f}, {hi:+.3f}] "
                     f"on {gain['queries']} held-out queries")
    return lines


def quality_lines(summary: dict) -> list[str]:
    """Lines (without indent) on the queries, the weights used and why, and each system's metrics."""
    rerank = summary.get("rerank_run") or {}
    metrics = rerank.get("metrics") or {}
    if not metrics:
        return []
    hybrid = rerank.get("hybrid") or {}
    gold = rerank.get("gold") or {}
    total = rerank.get("queries") or 0
    split = hybrid.get("split") or {}
    scored = gold.get("scored_queries", total)
    line = f"queries: {total}, {scored} scored"
    if gold.get("dropped_queries"):
        line += f" ({gold['dropped_queries']} dropped: their gold chunks are empty once the heading is masked)"
    lines = [line]
    heldout_label = f"held-out ({split.get('heldout_scored', split.get('heldout', 0))} queries)" \
        if hybrid.get("report_split", "heldout") == "heldout" else f"all queries ({scored}; too few to split)"
    if hybrid:
        lines += _choice_lines("hybrid weights", hybrid)
        default = (hybrid.get("default_weights") or {}).get("dense")
        if default is not None and hybrid["weights"].get("dense") != default:
            lines.append(f"   hybrid_dense_weight={default} (the default) was not used: the weights above were")
    if rerank.get("ensemble_tuning"):
        lines += _choice_lines("ensemble weights", rerank["ensemble_tuning"])
    for name, label in (("all_queries", f"all queries ({scored})"), ("heldout", heldout_label)):
        systems = hybrid.get(name) or {}
        if systems:
            lines.append(f"candidates on {label}: " + "; ".join(f"{s} {_figures(v)}" for s, v in systems.items()))
    # The final ranking as the small table (readable.metrics_text), its rows labelled by these counts.
    lines.append(f"final ranking, before / after rerank: rows on all queries ({scored}), "
                 f"then 'held-out' on {heldout_label}")
    return lines + metrics_text(metrics)
