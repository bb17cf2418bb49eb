"""Checks across materializations: retrieval quality against the previous run, and outputs that still
cite the current chunks.

- `reranked_quality`: held-out recall@10 and MRR@10 of this `reranked` materialization against the
  previous one of the same collection (read from the Dagster instance); fails when either drops by more
  than `quality_margin`, with severity `quality_severity` (warn by default), so a model or chunking change
  that hurts retrieval shows in the UI.
- `outputs_cite_current_chunks`: fails when the stored `queries` / `reranked` of the collection cite chunk
  ids that the current chunks no longer have, naming the stale assets and the run that wrote them. It
  depends on `queries` and `reranked` (additional_deps), so in a run that rematerializes them it runs after
  them and reads what they wrote; when one of them fails, the check does not run at all (Dagster skips it),
  instead of certifying files that this run never replaced (issue 22.2). In a run without them it reads
  the stored files as they are.
"""


from datetime import datetime, timezone

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.storage.layout import StorageLayout
from rag_clean.storage.arrow_io import ids_absent
from rag_clean.telemetry.summary import read_summary
from rag_clean_assets.partitions import collections_partitions
from resources.paths import PathsResource
from resources.settings import EmbedderSettingsResource

QUALITY_METRICS = ("recall@10", "mrr@10")
RERANKED_KEY = dg.AssetKey("reranked")


# Materializations of one collection in the check's trend table (newest first).
TREND_RUNS = 10


def trend_table(records: list[dg.EventLogRecord]) -> str:
    """Held-out quality of this collection's last materializations, newest first: the per-collection trend
    (the UI's metadata plots join every partition's points into one line)."""
    lines = ["| run | when (UTC) | " + " | ".join(QUALITY_METRICS) + " |", "|---|---|" + "---:|" * len(QUALITY_METRICS)]
    for record in records:
        quality = _quality_of(record)
        when = datetime.fromtimestamp(record.timestamp, timezone.utc).strftime("%m-%d %H:%M")
        cells = [f"{quality[m]:.3f}" if m in quality else "-" for m in QUALITY_METRICS]
        lines.append(f"| {record.run_id[:8]} | {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _quality_of(record: dg.EventLogRecord) -> dict[str, float]:
    metadata = record.asset_materialization.metadata if record.asset_materialization else {}
    return {m: float(metadata[f"quality/{m}"].value) for m in QUALITY_METRICS if f"quality/{m}" in metadata}


@dg.asset_check(asset=RERANKED_KEY, name="quality_vs_previous", partitions_def=collections_partitions,
                description="held-out recall@10 / MRR@10 not below the previous materialization by more than "
                            "quality_margin (severity: quality_severity)")
def reranked_quality(context: dg.AssetCheckExecutionContext, settings: EmbedderSettingsResource) -> dg.AssetCheckResult:
    resolved = settings.resolve()
    severity = dg.AssetCheckSeverity.ERROR if resolved.quality_severity == "error" else dg.AssetCheckSeverity.WARN
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RERANKED_KEY, asset_partitions=[context.partition_key]),
        limit=TREND_RUNS).records
    if not records:
        return dg.AssetCheckResult(passed=False, severity=severity, description="reranked has no materialization")
    current = _quality_of(records[0])
    metadata = {f"current/{m}": v for m, v in current.items()} | {"margin": resolved.quality_margin,
                                                                   "trend": dg.MetadataValue.md(trend_table(records))}
    if len(records) < 2 or not _quality_of(records[1]):
        return dg.AssetCheckResult(passed=True, metadata=metadata,
                                   description="first materialization with quality metrics: nothing to compare")
    previous = _quality_of(records[1])  # the one before this materialization
    metadata |= {f"previous/{m}": v for m, v in previous.items()}
    drops = [f"{m} {previous[m]:.3f} -> {current[m]:.3f}" for m in QUALITY_METRICS
             if m in current and m in previous and previous[m] - current[m] > resolved.quality_margin]
    return dg.AssetCheckResult(
        passed=not drops, severity=severity, metadata=metadata,
        description=("held-out retrieval got worse than the previous materialization by more than "
                     f"{resolved.quality_margin}: " + "; ".join(drops)) if drops else "not worse than the previous run")


def _cited_ids(path, column: str) -> set[str]:
    table = pq.read_table(path, columns=[column])
    values = table.column(column)
    if pa.types.is_list(values.type):
        values = pa.chunked_array([c.flatten() for c in values.chunks], type=values.type.value_type)
    return set(values.to_pylist())


@dg.asset_check(asset="chunks", name="outputs_cite_current_chunks", partitions_def=collections_partitions,
                additional_deps=["queries", "reranked"],
                description="the stored queries / reranked of this collection cite only chunk ids the chunks have "
                            "(read after this run's queries / reranked steps, if it has them)")
def outputs_cite_current_chunks(context: dg.AssetCheckExecutionContext, chunks: pa.Table,
                                paths: PathsResource) -> dg.AssetCheckResult:
    layout: StorageLayout = paths.layout()
    collection = context.partition_key
    summary_file = layout.summary_file(collection)
    stages = read_summary(summary_file).get("stages", {}) if summary_file.exists() else {}
    problems, metadata = [], {}
    for asset, column in (("queries", "gold_chunk_ids"), ("reranked", "chunk_id")):
        path = layout.asset_file([asset], collection)
        if not path.exists():
            continue
        missing = ids_absent(_cited_ids(path, column), chunks.column("chunk_id"))
        metadata[f"{asset}/unknown_chunk_ids"] = len(missing)
        if missing:
            run = (stages.get(asset) or {}).get("run_id") or "unknown"
            problems.append(f"{asset} (run {run[:8]}) cites {len(missing)} chunk ids the current chunks do not have "
                            f"(e.g. {sorted(missing)[0]}): rematerialize {asset} for {collection!r}")
    ok = "stored queries and reranked cite current chunks only"
    return dg.AssetCheckResult(passed=not problems, severity=dg.AssetCheckSeverity.WARN, metadata=metadata,
                               description="; ".join(problems) or ok)


QUALITY_CHECKS = [reranked_quality, outputs_cite_current_chunks]
