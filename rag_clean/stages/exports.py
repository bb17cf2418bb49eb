"""The exports stage: the old embedder's export files, with a copy of the processing summary that already
holds this stage's own record."""

from __future__ import annotations

import json

import pyarrow as pa

from rag_clean.exports.write import write_exports
from rag_clean.stages.context import EmbeddedChunks, Stage, StageContext, StageIO, start_record
from rag_clean.telemetry.downstream_records import ExportsRecord
from rag_clean.telemetry.summary import build_summary, read_summary, utc_now

EXPORTS_ASSET = "exports"


def _disabled(plan, inputs=None) -> ExportsRecord | None:
    reason = plan.exports_disabled_reason()
    return None if reason is None else ExportsRecord(reason=f"exports skipped: {reason}")


def exports_stage(ctx: StageContext, io: StageIO, inputs: EmbeddedChunks) -> tuple[pa.Table, ExportsRecord]:
    """Write the export files under the export folder; the value lists each file with bytes and sha256."""
    plan, collection, layout = ctx.plan, ctx.collection, ctx.layout
    # A disabled sparse stage leaves its previous file in place: never export that stale file.
    if plan.sparse_enabled and inputs.sparse is None:
        raise ValueError("sparse is enabled but sparse_vectors has no stored file for this collection: "
                         "materialize it first")
    meta = inputs.fused.metadata
    fusion = {"method": meta.get("method"), "models": json.loads(meta.get("models", "[]")),
              "weights": json.loads(meta.get("weights", "[]"))}
    summary_path = layout.summary_file(collection)
    base = start_record(ExportsRecord(device="cpu"), plan)

    def summary_with_this_stage(partial: dict) -> dict:
        """The summary copy, with this export's own (not yet stored) record in it."""
        stages = dict(read_summary(summary_path).get("stages", {})) if summary_path.exists() else {}
        stages[EXPORTS_ASSET] = ctx.timer.stamp(base).to_summary() | partial | {
            "asset_key": EXPORTS_ASSET, "run_id": ctx.run_id, "partition": collection, "materialized_at": utc_now()}
        return build_summary(collection, stages, plan.settings.as_dict(), dict(plan.settings.provenance))

    table, record = write_exports(
        layout.export_root(plan.export_dir), collection, inputs.chunks,
        {s.name: inputs.dense_sets.get(s.asset_name) for s in plan.dense}, inputs.fused, fusion=fusion,
        sparse=inputs.sparse if plan.sparse else None, sparse_models=[s.name for s in plan.sparse],
        summary=summary_with_this_stage, line_index=lambda kind: layout.export_line_index(collection, kind))
    ctx.log.info(f"exported {len(record.files)} files to {record.export_dir}")
    record.device = "cpu"
    return table, record


EXPORTS = Stage("exports", exports_stage, disabled=_disabled)
