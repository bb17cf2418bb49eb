"""Typed records of the stages after the vectors: evaluation queries, the reranked stage (with its
candidates table), and the two sinks (the old embedder's exports, the vector index). The record contract
and the encode-side records are in rag_clean.telemetry.records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rag_clean.encoders.base import EncodeStats
from rag_clean.telemetry.readable import metrics_markdown
from rag_clean.telemetry.records import StageRecord, MetaPath, MetaJson, MetaMarkdown, encode_fields, encode_metadata


@dataclass
class QueriesRecord(StageRecord):
    stage: ClassVar[str] = "queries"
    source: str = ""
    with_gold: int = 0
    text_mode: str = "hash"

    def stage_fields(self) -> dict:
        return {"source": self.source, "with_gold": self.with_gold, "query_text_mode": self.text_mode}

    def stage_metadata(self) -> dict:
        return {"source": self.source, "queries_with_gold": int(self.with_gold), "query_text_mode": self.text_mode}


@dataclass
class RerankRecord(StageRecord):
    stage: ClassVar[str] = "reranked"
    queries: int = 0
    top_k_candidates: int = 0
    rerank_top_k: int = 0
    rerank_enabled: bool = True
    rerank_executed: bool = False
    resolution: dict | None = None     # the reranker fallback chain, see encoders.factory.load_reranker
    candidate_sources: list[str] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)    # before/after rerank (all queries), heldout: {...}
    scorer: str = ""
    encode: EncodeStats | None = None
    hybrid: dict | None = None         # hybrid.Tuning.to_dict(): systems, weights, split, metrics of every candidate
    ensemble: dict | None = None       # the same for the dense models' weights, when tune_ensemble_weights
    reranker_gain: dict[str, float] = field(default_factory=dict)   # after - before rerank, held-out
    masked_gold_chunks: int = 0        # gold chunks of generated queries scored with their heading masked
    gold: dict = field(default_factory=dict)  # flat.ScoringGold.to_dict(): queries scored / dropped (empty gold)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part of the stage, in order

    def quality(self) -> dict[str, float | None]:
        """Held-out metrics of the final ranking: what the quality check compares between materializations."""
        heldout = self.metrics.get("heldout", {})
        final = heldout.get("after_rerank") or heldout.get("before_rerank") or {}
        return {m: final.get(m) for m in ("recall@10", "mrr@10", "ndcg@10")}

    def stage_fields(self) -> dict:
        return {"queries": self.queries, "top_k_candidates": self.top_k_candidates, "rerank_top_k": self.rerank_top_k,
                "rerank_enabled": self.rerank_enabled, "rerank_executed": self.rerank_executed,
                "resolution": self.resolution, "candidate_sources": list(self.candidate_sources),
                "metrics": dict(self.metrics), "scorer": self.scorer, "hybrid": self.hybrid, "ensemble": self.ensemble,
                "reranker_gain": dict(self.reranker_gain), "masked_gold_chunks": self.masked_gold_chunks,
                "gold": dict(self.gold), "phase_seconds": dict(self.phase_seconds), "quality": self.quality()} | encode_fields(self.encode)

    def stage_metadata(self) -> dict:
        out: dict[str, Any] = {"scorer": self.scorer, "rerank_executed": self.rerank_executed,
                               "candidate_sources": ", ".join(self.candidate_sources), "queries": int(self.queries)}
        for phase, values in self.metrics.items():
            if phase == "heldout":
                continue
            for name, value in values.items():
                if value is not None:
                    out[f"{phase}/{name}"] = float(value)
        for name, value in self.quality().items():
            if value is not None:
                out[f"quality/{name}"] = float(value)  # held-out, final ranking: read by the quality check
        if self.hybrid is not None:
            out["hybrid_weights"] = ", ".join(f"{k} {v:.2f}" for k, v in self.hybrid["weights"].items())
            out["hybrid_tuned"] = bool(self.hybrid.get("tuned"))
            out["hybrid_reason"] = str(self.hybrid.get("reason") or "")
            # Whether the cross-validated gate ran (enough queries): a default it kept is a decision, not a gap.
            out["hybrid_gate_ran"] = bool(self.hybrid.get("cv"))
            out["hybrid_candidates"] = MetaMarkdown(candidates_table(self.hybrid, self.ensemble))
        if self.gold:
            out["queries_scored"] = int(self.gold["scored_queries"])
            out["queries_dropped_empty_gold"] = int(self.gold["dropped_queries"])
        resolution = self.resolution or {}
        out["rerank_fallback_applied"] = bool(resolution.get("fallback_applied", False))
        if resolution.get("resolved"):
            out["reranker_source"] = str(resolution["resolved"])
        if resolution.get("fallback_applied") and resolution.get("reason"):
            first = str(resolution["reason"]).strip().splitlines()[0]
            out["rerank_fallback_reason"] = first if len(first) <= 300 else first[:299] + "\u2026"
        out["metrics_table"] = MetaMarkdown(metrics_markdown(self.metrics, self.candidate_sources, self.scorer))
        return out | encode_metadata(self.encode)


@dataclass
class ExportsRecord(StageRecord):
    stage: ClassVar[str] = "exports"
    export_dir: str = ""
    models: list[str] = field(default_factory=list)
    sparse_models: list[str] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)           # name, bytes, sha256
    removed_stale: list[str] = field(default_factory=list)

    @property
    def bytes_written(self) -> int:
        return int(sum(f["bytes"] for f in self.files))

    def stage_fields(self) -> dict:
        if self.disabled:
            return {}
        return {"export_dir": self.export_dir, "models": list(self.models), "sparse_models": list(self.sparse_models),
                "files": list(self.files), "removed_stale": list(self.removed_stale),
                "bytes_written": self.bytes_written}

    def stage_metadata(self) -> dict:
        if self.disabled:
            return {}
        return {"export_dir": MetaPath(self.export_dir), "files": len(self.files), "bytes_written": self.bytes_written}


@dataclass
class IndexRecord(StageRecord):
    """The vector_index sink: what one sync wrote. `location` never carries credentials."""

    stage: ClassVar[str] = "vector_index"
    sink: str = ""
    location: str = ""
    upserted: int = 0
    deleted: int = 0
    unchanged: int = 0
    rewritten: dict[str, int] = field(default_factory=dict)   # vector name -> points whose vector was rewritten
    recreated: bool = False
    index_rows: int = 0
    vectors: dict = field(default_factory=dict)               # IndexSchema.to_dict()
    write_s: float = 0.0      # reading the assets, deciding what changed, writing points
    commit_s: float = 0.0     # the sink's commit: Qdrant Edge builds the HNSW graph there

    def stage_fields(self) -> dict:
        if self.disabled:
            return {}
        return {"sink": self.sink, "location": self.location, "upserted": self.upserted, "deleted": self.deleted,
                "unchanged": self.unchanged, "rewritten": dict(self.rewritten), "recreated": self.recreated,
                "index_rows": self.index_rows, "vectors": dict(self.vectors), "write_s": self.write_s,
                "commit_s": self.commit_s}

    def stage_metadata(self) -> dict:
        if self.disabled:
            return {}
        return {"sink": self.sink, "location": self.location, "rows_upserted": int(self.upserted),
                "rows_deleted": int(self.deleted), "rows_unchanged": int(self.unchanged),
                "vectors_rewritten": MetaJson(dict(self.rewritten)), "recreated": bool(self.recreated),
                "index_rows": int(self.index_rows), "write_s": float(self.write_s), "commit_s": float(self.commit_s)}


def candidates_table(hybrid: dict, ensemble: dict | None = None) -> str:
    """Markdown: each candidate system's held-out metrics, the chosen weights and the split sizes."""
    metrics = ("recall@10", "mrr@10", "ndcg@10")  # three columns: the table fits the UI's metadata column
    lines = [f"{hybrid['reason']}. Weights: " + ", ".join(f"{k} {v:.2f}" for k, v in hybrid["weights"].items())
             + f"; split {hybrid['split']['tune']} tune / {hybrid['split']['heldout']} held-out; metrics on "
             + f"{hybrid.get('report_split', 'heldout')}.", "",
             "| candidates | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    rows = list(hybrid["heldout"].items()) + [(f"ensemble: {k}", v) for k, v in ((ensemble or {}).get("heldout") or {}).items()]
    for name, values in rows:
        cells = [f"{values[m]:.3f}" if values.get(m) is not None else "-" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
