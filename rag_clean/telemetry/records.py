"""Typed stage records: what each stage measured, rendered two ways.

Every stage returns one record. `to_summary()` is the dict stored under `stages[<asset key>]` in
processing_summary.json (the summary's v4.1 sections are built from those dicts, see telemetry);
`to_metadata()` is the Dagster materialization metadata, as plain values plus the `MetaPath` /
`MetaJson` / `MetaMarkdown` markers that the Dagster adapter turns into path / JSON / markdown metadata. Where a stored
stage dict is read back (the summary is rebuilt from every stage's stored dict, written by earlier processes), a typed
reader does it (rag_clean.telemetry.stored): nothing else reads a stage's fields by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rag_clean.encoders.base import EncodeStats
from rag_clean.telemetry.readable import metrics_markdown


@dataclass(frozen=True)
class MetaPath:
    path: str


@dataclass(frozen=True)
class MetaJson:
    value: Any


@dataclass(frozen=True)
class MetaMarkdown:
    text: str


def encode_fields(stats: EncodeStats | None) -> dict:
    """The encoder's measurements as the summary keeps them."""
    if stats is None:
        return {}
    return {"encode": stats.to_dict(), "batch_seconds": [round(b.seconds, 6) for b in stats.batches],
            "batch_items": [b.items for b in stats.batches]}


def truncation_warning(stats: EncodeStats | None, total: int) -> str | None:
    """One line when inputs were longer than the model's max length (they are encoded from their first tokens)."""
    if stats is None or not stats.truncated_inputs:
        return None
    return (f"{stats.model}: {stats.truncated_inputs} of {total} chunks are longer than its max_length "
            f"({stats.max_length} tokens) and were encoded from their first {stats.max_length} tokens")


def _encode_metadata(stats: EncodeStats | None) -> dict:
    """Throughput only where something was encoded: after full reuse a rate over zero work means nothing."""
    if stats is None:
        return {}
    out = {"oom_mitigations": len(stats.oom_mitigations), "chunks_truncated": int(stats.truncated_inputs)}
    if stats.items:
        out["tokens_per_second"] = round(float(stats.tokens_per_second()), 1)
    if stats.oom_mitigations:
        out["batch_mitigations"] = MetaJson(stats.oom_mitigations)
    return out


def lease_metadata(lease: dict | None) -> dict:
    """The lease as the UI shows it: where, how long it waited for the device, how long it held it (the
    summary keeps every field: holder, VRAM snapshots, events)."""
    if not lease:
        return {}
    return {"lease_devices": ", ".join(lease.get("devices") or []),
            "lease_wait_s": round(float(lease.get("wait_seconds") or 0.0), 3),
            "lease_held_s": round(float(lease.get("held_seconds") or 0.0), 3)}


def reuse_metadata(counts: dict[str, ReuseCount]) -> dict:
    """Reused vs computed, named by what was counted (`files_reused` for chunks, whose rows are chunks)."""
    out: dict[str, Any] = {}
    for count in counts.values():
        for kind, value in (("reused", count.reused), ("computed", count.computed)):
            key = f"{count.unit}_{kind}"
            out[key] = int(out.get(key, 0) + value)
    if len(counts) > 1:  # several models or units: the breakdown says something the sums do not
        out["reuse"] = MetaJson({name: c.to_dict() for name, c in counts.items()})
    return out


@dataclass
class ReuseCount:
    """How much of one unit of work a stage reused from its previous materialization vs computed now.

    Keyed in `StageRecord.reuse_counts` by what was counted: a model name ("minilm"), or "files",
    "query_vectors", "rerank_pairs", "export_lines"... `unit` says what a row is ("chunks", "files", ...)."""

    reused: int = 0
    computed: int = 0
    unit: str = "chunks"

    def to_dict(self) -> dict:
        return {"unit": self.unit, "reused": int(self.reused), "computed": int(self.computed)}


@dataclass
class StageRecord:
    """Fields every stage has. Set by the stage: rows, status, device, warnings; by the asset: toggles,
    timing and the lease; at the storage boundary: where the value went."""

    stage: ClassVar[str] = "stage"

    rows: int = 0
    status: str = "ok"                 # ok | fallback | disabled
    reason: str | None = None          # why a stage was disabled or fell back
    device: str | None = None
    warnings: list[str] = field(default_factory=list)
    toggles: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    started_at: str | None = None
    duration_s: float | None = None
    lease: dict | None = None
    events: list[dict] = field(default_factory=list)
    # Filled by the storage boundary.
    asset_key: str | None = None
    run_id: str | None = None
    partition: str | None = None
    materialized_at: str | None = None
    path: str | None = None
    bytes: int = 0
    # Reused vs computed work, per model or unit (see ReuseCount). Every stage that can reuse fills it.
    reuse_counts: dict[str, ReuseCount] = field(default_factory=dict)
    # Peak anonymous RSS of the step (rag_clean.telemetry.memory: file-backed mmap pages excluded), set at storage.
    peak_rss_anon_bytes: int | None = None

    @property
    def disabled(self) -> bool:
        return self.status == "disabled"

    def counts(self) -> dict[str, ReuseCount]:
        """Reused vs computed per model/unit; subclasses with their own counters override."""
        return dict(self.reuse_counts)

    def reuse_line(self, label: str) -> str | None:
        """The run log's one line per stage: what was reused and what was computed."""
        counts = self.counts()
        if self.disabled or not counts:
            return None
        parts = [f"{name}: {c.computed:,} computed, {c.reused:,} reused {c.unit}" for name, c in counts.items()]
        return f"{label} reuse: " + "; ".join(parts)

    def stage_fields(self) -> dict:
        """The stage's own summary fields (subclasses)."""
        return {}

    def stage_metadata(self) -> dict:
        """The stage's own Dagster metadata (subclasses)."""
        return {}

    def to_summary(self) -> dict:
        out = {"stage": self.stage, "toggles": self.toggles, "provenance": self.provenance, "rows": self.rows,
               "status": self.status, "device": self.device, "warnings": list(self.warnings),
               "started_at": self.started_at, "duration_s": self.duration_s, "lease": self.lease,
               "events": list(self.events), "asset_key": self.asset_key, "run_id": self.run_id,
               "partition": self.partition, "materialized_at": self.materialized_at, "path": self.path,
               "bytes": self.bytes, "peak_rss_anon_bytes": self.peak_rss_anon_bytes}
        if self.reason is not None:
            out["reason"] = self.reason
        counts = self.counts()
        if counts:
            out["reuse_counts"] = {name: c.to_dict() for name, c in counts.items()}
        out.update(self.stage_fields())
        return out

    def to_metadata(self, summary_file: str) -> dict:
        """One typed value per fact: counts as int, seconds and ratios as float, files as paths."""
        out: dict[str, Any] = {"status": self.status, "duration_s": round(float(self.duration_s or 0.0), 3),
                               "summary": MetaPath(summary_file)}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.disabled:  # it stored nothing this run: no rows, size or reuse to claim
            return out | self.stage_metadata()
        out |= {"rows": int(self.rows), "bytes": int(self.bytes)}
        if self.path:
            out["path"] = MetaPath(self.path)
        if self.device is not None:
            out["device"] = self.device
        if self.peak_rss_anon_bytes is not None:
            out["peak_rss_anon_bytes"] = int(self.peak_rss_anon_bytes)
        out |= lease_metadata(self.lease)
        out |= reuse_metadata(self.counts())
        out.update(self.stage_metadata())
        return out


def skips_warning(skips: list[dict], shown: int = 3) -> str | None:
    """One line for the summary's warnings when inputs were skipped: how many, the first few and why."""
    if not skips:
        return None
    first = "; ".join(f"{s['file']}" + (f" #{s['index']}" if s.get("index") is not None else "") + f": {s['reason']}"
                      for s in skips[:shown])
    more = f"; and {len(skips) - shown} more" if len(skips) > shown else ""
    return f"chunks: {len(skips)} inputs skipped ({first}{more}); every skip is in stages.chunks.skips"


@dataclass
class ChunksRecord(StageRecord):
    stage: ClassVar[str] = "chunks"
    files_read: int = 0
    skips: list[dict] = field(default_factory=list)   # {"file", "index", "reason"}
    packing: dict = field(default_factory=dict)       # the tokenizer documents were packed by, and the budget

    def stage_fields(self) -> dict:
        return {"files_read": self.files_read, "skipped": len(self.skips), "skips": list(self.skips),
                "packing": dict(self.packing)}

    def stage_metadata(self) -> dict:
        out = {"files_read": self.files_read, "chunks_skipped": len(self.skips)}
        if self.packing:
            out["packed_by"] = (f"{self.packing['model']} tokenizer, {self.packing['max_tokens']} tokens"
                                if self.packing.get("model") else f"token estimate, {self.packing['max_tokens']} tokens")
        return out


@dataclass
class DenseRecord(StageRecord):
    stage: ClassVar[str] = "dense"
    model: str = ""
    dim: int | None = None
    native_dim: int | None = None
    weight: float = 1.0
    reused: int = 0
    computed: int = 0
    encode: EncodeStats | None = None
    joint: dict | None = None          # see stages.joint.JointSideFiles.record
    truncated: int = 0                 # stored vectors embedded from a truncated text, reused ones included
    truncated_reused: int = 0

    def counts(self) -> dict[str, ReuseCount]:
        return {self.model: ReuseCount(self.reused, self.computed, "chunks")} if self.model else {}

    def stage_fields(self) -> dict:
        out = {"model": self.model}
        if self.disabled:
            return out
        out |= {"dim": self.dim, "native_dim": self.native_dim, "weight": self.weight,
                "reuse": {"reused": self.reused, "computed": self.computed}, "exclusive": True,
                "truncated_chunks": {"total": self.truncated, "reused": self.truncated_reused}}
        if self.joint is not None:
            out["joint"] = self.joint
        return out | encode_fields(self.encode)

    def stage_metadata(self) -> dict:
        out: dict[str, Any] = {"model": self.model}
        if self.disabled:
            return out
        if self.dim is not None:
            out["dim"] = int(self.dim)
        out |= _encode_metadata(self.encode)
        out["chunks_truncated"] = int(self.truncated)  # of the stored vectors, reused ones included
        if self.joint is not None:
            info = self.joint
            if info["sparse_partner"]:
                out |= {"joint_sparse_partner": info["sparse_partner"], "joint_sparse_file": MetaPath(info["sparse_file"]),
                        "joint_sparse_rows": int(info["sparse_rows"])}
            if info["colbert_file"]:
                out |= {"colbert_file": MetaPath(info["colbert_file"]), "colbert_rows": int(info["colbert_rows"]),
                        "colbert_dim": int(info["colbert_dim"] or 0)}
            out["joint_extra_pass_rows"] = int(info["extra_pass_rows"])
        return out


@dataclass
class FusedRecord(StageRecord):
    stage: ClassVar[str] = "fused"
    method: str = "concat"
    models: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)   # normalized to sum 1
    dim: int = 0
    fuse_seconds: float = 0.0

    def stage_fields(self) -> dict:
        return {"method": self.method, "models": list(self.models), "weights": dict(self.weights), "dim": self.dim,
                "fuse_seconds": self.fuse_seconds}

    def stage_metadata(self) -> dict:
        return {"method": self.method, "dim": int(self.dim)}


@dataclass
class SparseRecord(StageRecord):
    stage: ClassVar[str] = "sparse"
    model_names: list[str] = field(default_factory=list)
    per_model: dict[str, dict] = field(default_factory=dict)
    batch_seconds: list[float] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    fallback_used: bool = False
    fallback_reason: str | None = None
    top_k: dict[str, int] = field(default_factory=dict)
    shared_pass_with_dense: list[str] = field(default_factory=list)
    shared_pass: dict[str, dict] = field(default_factory=dict)
    vectors_available: int = 0

    def stage_fields(self) -> dict:
        if self.disabled:
            return {"model_names": []}
        return {"model_names": list(self.model_names), "per_model": dict(self.per_model),
                "batch_seconds": list(self.batch_seconds), "devices": list(self.devices),
                "fallback_used": self.fallback_used, "fallback_reason": self.fallback_reason, "top_k": dict(self.top_k),
                "shared_pass_with_dense": list(self.shared_pass_with_dense), "shared_pass": dict(self.shared_pass),
                "vectors": {"total": self.rows, "available": self.vectors_available}}

    def stage_metadata(self) -> dict:
        if self.disabled:
            return {}
        out: dict[str, Any] = {
            "models": ", ".join(self.model_names),
            "coverage_ratio": round(self.vectors_available / self.rows, 6) if self.rows else 0.0,
            "fallback_used": bool(self.fallback_used)}
        if self.shared_pass:
            out["shared_pass_with_dense"] = ", ".join(self.shared_pass_with_dense)
            out["shared_pass"] = MetaJson(self.shared_pass)
        return out


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
        return out | _encode_metadata(self.encode)


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

    def stage_fields(self) -> dict:
        if self.disabled:
            return {}
        return {"sink": self.sink, "location": self.location, "upserted": self.upserted, "deleted": self.deleted,
                "unchanged": self.unchanged, "rewritten": dict(self.rewritten), "recreated": self.recreated,
                "index_rows": self.index_rows, "vectors": dict(self.vectors)}

    def stage_metadata(self) -> dict:
        if self.disabled:
            return {}
        return {"sink": self.sink, "location": self.location, "rows_upserted": int(self.upserted),
                "rows_deleted": int(self.deleted), "rows_unchanged": int(self.unchanged),
                "vectors_rewritten": MetaJson(dict(self.rewritten)), "recreated": bool(self.recreated),
                "index_rows": int(self.index_rows)}


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
