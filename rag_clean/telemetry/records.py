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


def encode_metadata(stats: EncodeStats | None) -> dict:
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
        """The run log's one line per stage: what was reused and what was computed; None when nothing was
        reused (a first run: "145 computed, 0 reused" says nothing the metadata does not)."""
        counts = self.counts()
        if self.disabled or not any(c.reused for c in counts.values()):
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
        out |= encode_metadata(self.encode)
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
