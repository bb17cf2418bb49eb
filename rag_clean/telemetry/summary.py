"""processing_summary.json (schema v4.2, a superset of the old embedder's v4.1) and the events log.

Each asset materialization records one *stage record* (measured values only). The summary is
rebuilt from all stage records of the collection every time one changes, so it always describes
the latest materialization of every stage, and the v4.1 keys keep their old meaning.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from filelock import FileLock

from rag_clean.storage.layout import StorageLayout
from rag_clean.telemetry.records import StageRecord
from rag_clean.storage.atomic import write_json
from rag_clean.telemetry.stored import DenseRun

SCHEMA_VERSION = "v4.2"
LEGACY_VERSIONS = ("v4.1", "v4.0")
SUPPORTED_VERSIONS = (SCHEMA_VERSION, *LEGACY_VERSIONS)

# Keys every v4.1 summary had; v4.2 keeps all of them with the same meaning.
V41_KEYS = (
    "schema_version", "generated_at", "collection", "chunk_count", "feature_toggles", "dense_run",
    "rerank_run", "sparse_run", "compatibility", "telemetry", "warnings", "performance_baseline",
)
# v4.0 predates compatibility / telemetry spans / performance_baseline.
V40_KEYS = tuple(k for k in V41_KEYS if k not in ("compatibility", "telemetry", "performance_baseline"))
REQUIRED_KEYS = {"v4.0": V40_KEYS, "v4.1": V41_KEYS, "v4.2": (*V41_KEYS, "stages")}
# Nested keys of v4.1 that v4.2 keeps with the same meaning; readers of either version may rely on them.
V41_NESTED_KEYS = {
    "feature_toggles": ("enable_rerank", "enable_sparse", "sparse_models", "provenance", "provenance_lines"),
    "dense_run": ("total_embeddings_generated", "models_executed", "device", "batch_size", "latency_seconds"),
    "rerank_run": ("enabled", "executed", "status", "model_name", "fallback_count", "fallback_reason", "device_state"),
    "sparse_run": ("enabled", "model_names", "vectors", "devices", "latency_ms", "fallback_used"),
    "compatibility": ("current", "legacy", "warnings"),
    "telemetry": ("spans", "metrics"),
}

SPAN_NAMES = {"dense": "rag.dense", "fused": "rag.fusion", "sparse": "rag.sparse", "reranked": "rag.rerank",
              "exports": "rag.export", "chunks": "rag.chunk", "queries": "rag.queries"}


class TelemetryError(ValueError):
    """A summary file is unreadable or of an unknown schema version."""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def percentiles(values: Iterable[float]) -> dict[str, float]:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    return {k: round(float(np.percentile(arr, q)), 6) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))}


# ---------------------------------------------------------------- building the summary


def _dense_run(stages: Mapping[str, dict]) -> dict:
    runs = DenseRun.all_in(stages)
    dense = [r for r in runs if not r.disabled]
    items_per_batch = [n for r in dense for n in r.batch_items]
    devices = sorted({str(r.device) for r in dense if r.device})
    per_model = {r.model: r.per_model() for r in dense}
    return {
        "total_embeddings_generated": int(sum(r.computed or 0 for r in dense)),
        "models_executed": sorted(per_model),
        "device": ",".join(devices) if devices else None,
        # The old embedder used a fixed item batch; batches are now token-budgeted, so this is the median item count.
        "batch_size": int(np.median(items_per_batch)) if items_per_batch else 0,
        "latency_seconds": percentiles(s for r in dense for s in r.batch_seconds),
        "per_model": per_model,
        "chunks_reused": int(sum(r.reused or 0 for r in dense)),
        "models_skipped": sorted(r.model for r in runs if r.disabled),
        "exclusive_ensemble": all(r.exclusive for r in dense) if dense else True,
    }


def _sparse_run(stage: dict | None, toggles: Mapping) -> dict:
    enabled = bool(toggles.get("enable_sparse", True))
    if not stage:
        return {"enabled": enabled, "executed": False, "status": "not_materialized", "model_names": [],
                "vectors": {"total": 0, "available": 0, "coverage_ratio": 0.0}, "devices": [],
                "latency_ms": percentiles([]), "fallback_used": False}
    vectors = stage.get("vectors", {"total": 0, "available": 0})
    total = vectors.get("total", 0) or 0
    return {
        "enabled": stage.get("status") != "disabled",
        "executed": stage.get("status") in ("ok", "fallback"),
        "status": stage.get("status"),
        "model_names": stage.get("model_names", []),
        "vectors": {"total": total, "available": vectors.get("available", 0),
                    "coverage_ratio": round(vectors.get("available", 0) / total, 6) if total else 0.0},
        "devices": stage.get("devices", []),
        "latency_ms": percentiles(1000.0 * s for s in stage.get("batch_seconds", [])),
        "fallback_used": bool(stage.get("fallback_used", False)),
        "fallback_reason": stage.get("fallback_reason"),
        "shared_pass_with_dense": stage.get("shared_pass_with_dense", []),
        "top_k": stage.get("top_k"),
        "reason": stage.get("reason"),
    }


def _rerank_run(stage: dict | None, toggles: Mapping) -> dict:
    if not stage:
        return {"enabled": bool(toggles.get("enable_rerank", True)), "executed": False, "status": "not_materialized",
                "model_name": None, "fallback_count": 0, "fallback_reason": None,
                "device_state": {"requested": None, "resolved": None, "fallback_applied": False}}
    res = stage.get("resolution") or {}
    enabled = bool(stage.get("rerank_enabled"))
    return {
        "enabled": enabled,
        "executed": bool(stage.get("rerank_executed")),
        # v4.1 meaning: "disabled" when the toggle is off (the stage record says "ok": retrieval still ran).
        "status": stage.get("status") if enabled else "disabled",
        "model_name": res.get("resolved"),
        "scorer": stage.get("scorer"),
        # Sources that failed to load before one loaded (or all of them): `attempts` lists failures only.
        "fallback_count": len(res.get("attempts", [])),
        "fallback_reason": res.get("reason"),
        "device_state": {
            "requested": res.get("requested"),
            "resolved": res.get("resolved"),
            "fallback_applied": bool(res.get("fallback_applied", False)),
            "device": stage.get("device"),
        },
        "attempts": res.get("attempts", []),
        "queries": stage.get("queries"),
        "top_k_candidates": stage.get("top_k_candidates"),
        "rerank_top_k": stage.get("rerank_top_k"),
        "candidate_sources": stage.get("candidate_sources"),
        "metrics": stage.get("metrics", {}),
        "hybrid": stage.get("hybrid"),
        "ensemble_tuning": stage.get("ensemble"),
        "reranker_gain": stage.get("reranker_gain", {}),
        "quality": stage.get("quality", {}),
        "masked_gold_chunks": stage.get("masked_gold_chunks", 0),
        "gold": stage.get("gold", {}),
        "phase_seconds": stage.get("phase_seconds", {}),
        "latency_ms": percentiles(1000.0 * s for s in stage.get("batch_seconds", [])),
        "oom_mitigations": (stage.get("encode") or {}).get("oom_mitigations", []),
    }


def _truncated_per_model(stages: Mapping[str, dict]) -> dict[str, int]:
    """Chunks each model encoded from their first max_length tokens (dense stages and each sparse model)."""
    out = {}
    for run in DenseRun.all_in(stages):  # the stored vectors, reused ones included
        if not run.disabled and (run.truncated is not None or run.encode):
            out[run.model] = run.truncated_chunks
    for rec in stages.values():
        if rec.get("stage") == "sparse":
            for name, enc in (rec.get("per_model") or {}).items():
                if "truncated_inputs" in enc:
                    out[name] = int(enc["truncated_inputs"] or 0)
    return dict(sorted(out.items()))


def _runs(stages: Mapping[str, dict]) -> dict:
    """Which run produced each stage, and the stages that are not from the run of the latest chunks
    (after a run that failed part way, those may describe older chunks: see the chunks check
    outputs_cite_current_chunks)."""
    by_stage = {key: rec.get("run_id") for key, rec in sorted(stages.items())}
    chunks_run = by_stage.get("chunks")
    return {"by_stage": by_stage, "chunks_run_id": chunks_run,
            "stages_from_other_runs": sorted(k for k, r in by_stage.items() if chunks_run and r != chunks_run)}


def _spans(stages: Mapping[str, dict]) -> list[dict]:
    spans = []
    for key, rec in sorted(stages.items()):
        spans.append({
            "name": SPAN_NAMES.get(rec.get("stage"), f"rag.{rec.get('stage')}"),
            "asset_key": key,
            "start": rec.get("started_at"),
            "end": rec.get("materialized_at"),
            "duration_s": rec.get("duration_s"),
            "status": rec.get("status"),
            "run_id": rec.get("run_id"),
        })
    return spans


def build_summary(collection: str, stages: Mapping[str, dict], toggles: Mapping[str, Any],
                  provenance: Mapping[str, str], previous_warnings: Iterable[str] = ()) -> dict:
    """Assemble the v4.2 summary from the latest stage record of every asset of the collection."""
    chunks = stages.get("chunks") or {}
    sparse = next((v for v in stages.values() if v.get("stage") == "sparse"), None)
    rerank = next((v for v in stages.values() if v.get("stage") == "reranked"), None)
    warnings = sorted({w for rec in stages.values() for w in rec.get("warnings", [])})
    throughput = {
        key: {"rows_per_second": round(rec["rows"] / rec["duration_s"], 3) if rec.get("duration_s") and rec.get("rows") else 0.0,
              "tokens_per_second": (rec.get("encode") or {}).get("tokens_per_second")}
        for key, rec in stages.items()
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": utc_now(),
        "collection": collection,
        "chunk_count": int(chunks.get("rows", 0) or 0),
        "feature_toggles": {
            "enable_rerank": bool(toggles.get("enable_rerank", True)),
            "enable_sparse": bool(toggles.get("enable_sparse", True)),
            "sparse_models": list(toggles.get("sparse_models", [])),
            "provenance": dict(provenance),
            "provenance_lines": [f"{k}={json.dumps(toggles.get(k))} ({provenance.get(k, 'default')})" for k in toggles],
            "all": dict(toggles),
        },
        "dense_run": _dense_run(stages),
        "fused_run": {k: stages["fused_embeddings"].get(k) for k in ("method", "weights", "models", "dim", "rows", "duration_s")}
        if "fused_embeddings" in stages else None,
        "rerank_run": _rerank_run(rerank, toggles),
        "sparse_run": _sparse_run(sparse, toggles),
        "compatibility": {"current": SCHEMA_VERSION, "legacy": list(LEGACY_VERSIONS), "warnings": []},
        "telemetry": {
            "spans": _spans(stages),
            "metrics": {
                "throughput": throughput,
                "oom_mitigations_total": int(sum(len((r.get("encode") or {}).get("oom_mitigations", [])) for r in stages.values())),
                "chunks_skipped": int(chunks.get("skipped", 0) or 0),
                "chunks_truncated": _truncated_per_model(stages),
            },
        },
        "warnings": warnings,
        "performance_baseline": {
            key: {"duration_s": rec.get("duration_s"), "rows": rec.get("rows"), "device": rec.get("device")}
            for key, rec in stages.items()
        },
        "runs": _runs(stages),
        "stages": dict(stages),
    }


# ---------------------------------------------------------------- store


class TelemetryStore:
    """Per-collection summary + append-only events log, where the storage layout puts them."""

    def __init__(self, layout: StorageLayout):
        self.layout = layout

    def folder(self, collection: str) -> Path:
        return self.layout.telemetry_dir(collection)

    def summary_path(self, collection: str) -> Path:
        return self.layout.summary_file(collection)

    def events_path(self, collection: str) -> Path:
        return self.layout.events_file(collection)

    def _lock(self, collection: str) -> FileLock:
        folder = self.folder(collection)
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / ".summary.lock"))

    def record_stage(self, collection: str, asset_key: str, record: dict, toggles: Mapping[str, Any],
                     provenance: Mapping[str, str]) -> dict:
        with self._lock(collection):
            path = self.summary_path(collection)
            stages = {}
            if path.exists():
                stages = read_summary(path).get("stages", {})
            stages[asset_key] = record
            summary = build_summary(collection, stages, toggles, provenance)
            write_json(path, summary)
        return summary

    def append_events(self, collection: str, events: Iterable[Mapping[str, Any]]) -> None:
        lines = "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in events)
        if not lines:
            return
        with self._lock(collection):
            with open(self.events_path(collection), "a", encoding="utf-8") as fh:
                fh.write(lines)
                fh.flush()
                os.fsync(fh.fileno())

    def read_events(self, collection: str) -> list[dict]:
        path = self.events_path(collection)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def record_materialization(layout: StorageLayout, record: StageRecord) -> dict:
    """The storage boundary's one telemetry call: merge `record` (asset_key, run_id, partition set) into
    the collection's summary, append its events, and return its materialization metadata."""
    store = TelemetryStore(layout)
    collection = record.partition
    store.record_stage(collection, record.asset_key, record.to_summary(), record.toggles, record.provenance)
    detail = {"status": record.status, "rows": record.rows, "dim": getattr(record, "dim", None), "bytes": record.bytes,
              "duration_s": record.duration_s, "device": record.device}
    events = [{"ts": record.materialized_at, "run_id": record.run_id, "asset": record.asset_key, "partition": collection,
               "event": "disabled" if record.disabled else "materialized", "detail": detail}]
    events += [dict(e, run_id=record.run_id, asset=record.asset_key, partition=collection) for e in record.events]
    store.append_events(collection, events)
    return record.to_metadata(str(store.summary_path(collection)))


def read_summary(path: Path) -> dict:
    """Read a processing summary of schema v4.0, v4.1 or v4.2; other versions are refused."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TelemetryError(f"{path}: cannot read processing summary: {exc}") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in SUPPORTED_VERSIONS:
        raise TelemetryError(f"{path}: schema_version {version!r} is not one of {SUPPORTED_VERSIONS}")
    missing = [k for k in REQUIRED_KEYS[version] if k not in data]
    if version != "v4.0":
        missing += [f"{section}.{k}" for section, keys in V41_NESTED_KEYS.items()
                    if isinstance(data.get(section), dict) for k in keys if k not in data[section]]
    if missing:
        raise TelemetryError(f"{path}: {version} summary lacks keys {missing}")
    data.setdefault("stages", {})
    return data
