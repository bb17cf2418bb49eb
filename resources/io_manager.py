"""Telemetry IO manager: stores each asset value and records what it measured.

At the storage boundary it (1) writes the value atomically (Parquet tables, Arrow IPC embedding
matrices published from their staged file), (2) attaches rows, dims, bytes, durations, device,
lease summary and batch mitigations as Dagster metadata, and (3) merges the stage record into the
collection's processing_summary.json (schema v4.2) and appends to its events log.
A disabled stage writes no file, so the previous materialization stays intact.
"""


from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa

from rag_clean.stages.common import StageOutput
from rag_clean.storage import EmbeddingWriter, StorageError, TableWriter, read_embeddings, read_table, write_table
from rag_clean.telemetry import TelemetryStore, utc_now
from resources.paths import PathsResource

EMBEDDING_ROOTS = ("dense_embeddings", "fused_embeddings")
# Stages that can be switched off (sparse toggle, dense models outside ensemble_models): a missing
# file loads as None so the consumer decides, instead of failing the whole downstream graph.
OPTIONAL_INPUT_ROOTS = ("sparse_vectors", "dense_embeddings")


def suffix_for(asset_path: list[str]) -> str:
    return ".arrow" if asset_path[0] in EMBEDDING_ROOTS else ".parquet"


def _scalar(value: Any) -> Any:
    """Dagster metadata rejects numpy scalars."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


class TelemetryIOManager(dg.ConfigurableIOManager):
    paths: dg.ResourceDependency[PathsResource]

    def _file(self, context: dg.OutputContext | dg.InputContext) -> tuple[Path, str]:
        asset_path = list(context.asset_key.path)
        if not context.has_partition_key:
            raise StorageError(f"asset {'/'.join(asset_path)} must be materialized for one collection partition")
        collection = context.partition_key
        return self.paths.asset_file(asset_path, collection, suffix_for(asset_path)), collection

    def handle_output(self, context: dg.OutputContext, obj: StageOutput) -> None:
        if not isinstance(obj, StageOutput):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected a StageOutput, got {type(obj).__name__}")
        path, collection = self._file(context)
        asset_key = context.asset_key.to_user_string()
        record = dict(obj.record)
        record.update(asset_key=asset_key, run_id=context.run_id, partition=collection, materialized_at=utc_now())

        if obj.disabled:
            record.setdefault("status", "disabled")
            record["path"] = None
            record["bytes"] = 0
        elif isinstance(obj.value, (EmbeddingWriter, TableWriter)):
            obj.value.final_path = path
            obj.value.publish()
            record["path"] = str(path)
            record["bytes"] = path.stat().st_size
        elif isinstance(obj.value, pa.Table):
            record["bytes"] = write_table(obj.value, path)
            record["path"] = str(path)
        else:
            raise TypeError(f"{asset_key}: unsupported value type {type(obj.value).__name__}")
        record.setdefault("status", "ok")

        store = TelemetryStore(self.paths.storage_dir())
        store.record_stage(collection, asset_key, record, record.get("toggles", {}), record.get("provenance", {}))
        events = [{"ts": record["materialized_at"], "run_id": context.run_id, "asset": asset_key,
                   "partition": collection, "event": "materialized" if record["status"] != "disabled" else "disabled",
                   "detail": {k: record.get(k) for k in ("status", "rows", "dim", "bytes", "duration_s", "device")}}]
        events += [dict(e, run_id=context.run_id, asset=asset_key, partition=collection) for e in record.get("events", [])]
        store.append_events(collection, events)

        metadata: dict[str, Any] = {
            "status": record["status"],
            "rows": int(record.get("rows") or 0),
            "bytes": int(record["bytes"]),
            "duration_s": float(record.get("duration_s") or 0.0),
            "summary": dg.MetadataValue.path(str(store.summary_path(collection))),
        }
        if record.get("path"):
            metadata["path"] = dg.MetadataValue.path(record["path"])
        for key in ("dim", "device", "reason"):
            if record.get(key) is not None:
                metadata[key] = _scalar(record[key])
        if record.get("lease"):
            metadata["lease"] = dg.MetadataValue.json(record["lease"])
        encode = record.get("encode") or {}
        if encode:
            metadata["oom_mitigations"] = len(encode.get("oom_mitigations", []))
            metadata["tokens_per_second"] = float(encode.get("tokens_per_second") or 0.0)
            if encode.get("oom_mitigations"):
                metadata["batch_mitigations"] = dg.MetadataValue.json(encode["oom_mitigations"])
        if "reuse" in record:
            metadata["chunks_reused"] = int(record["reuse"].get("reused", 0))
            metadata["chunks_computed"] = int(record["reuse"].get("computed", 0))
        metadata.update({k: _scalar(v) for k, v in obj.metadata.items()})
        context.add_output_metadata(metadata)

    def load_input(self, context: dg.InputContext) -> Any:
        path, _ = self._file(context)
        if not path.exists():
            if context.asset_key.path[0] in OPTIONAL_INPUT_ROOTS:
                return None  # absent when the stage was disabled; consumers that need it say so
            raise StorageError(
                f"{path} does not exist: materialize {context.asset_key.to_user_string()} for {context.partition_key!r} first"
            )
        if path.suffix == ".arrow":
            return read_embeddings(path)
        return read_table(path)
