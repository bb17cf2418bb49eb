"""WARN checks for states that work but are not what the user asked for: a materialization that is green
yet degraded says so in the UI, with the reason in the check's description.

- `sparse_vectors/stage_enabled`: the sparse stage materialized as "disabled" (it must still materialize:
  `reranked` takes it as an input, and a skipped output would skip `reranked` too), so reranked ran on
  dense candidates only.
- `reranked/cross_encoder_loaded`: the registry's reranker did not load; a fallback source reranked, or no
  cross-encoder did and the results keep retrieval order.
- `reranked/hybrid_weights_tuned`: the dense/sparse weights stayed at their documented defaults because
  there were too few queries with gold chunks to tune on. A default kept by the cross-validated gate
  (tuning ran, its gain was within the noise: rag_clean.retrieval.hybrid.choose_weights) passes.

Each reads the latest materialization of its partition from the instance, not an in-run output: it runs
after its asset in a run, and on its own (the `check_collection` job, one partition per run).
"""


import dagster as dg

from rag_clean_assets.partitions import collections_partitions
from rag_clean_assets.versions import STATUS_TAG

RERANKED_KEY = dg.AssetKey("reranked")
SPARSE_KEY = dg.AssetKey("sparse_vectors")
WARN = dg.AssetCheckSeverity.WARN


def latest_materialization(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> dg.EventLogRecord | None:
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[context.partition_key]), limit=1).records
    return records[0] if records else None


def _value(record: dg.EventLogRecord, name: str):
    entry = (record.asset_materialization.metadata or {}).get(name)
    return getattr(entry, "value", entry)


def _missing(key: dg.AssetKey, collection: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=WARN,
                               description=f"{key.to_user_string()} has no materialization for {collection!r} yet")


@dg.asset_check(asset=SPARSE_KEY, name="stage_enabled", partitions_def=collections_partitions, blocking=False,
                description="WARN when the sparse stage was disabled: reranked then retrieves by dense vectors only "
                            "(the reason is the setting that disabled it)")
def sparse_stage_enabled(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    record = latest_materialization(context, SPARSE_KEY)
    if record is None:
        return _missing(SPARSE_KEY, context.partition_key)
    status = (record.asset_materialization.tags or {}).get(STATUS_TAG) or _value(record, "status")
    if status == "disabled":
        reason = _value(record, "reason") or "disabled by settings"
        return dg.AssetCheckResult(passed=False, severity=WARN, metadata={"status": "disabled"},
                                   description=f"sparse stage disabled ({reason}): no sparse vectors were computed; "
                                               "reranked used dense candidates only")
    return dg.AssetCheckResult(passed=True, metadata={"status": str(status)}, description="sparse vectors computed")


@dg.asset_check(asset=RERANKED_KEY, name="cross_encoder_loaded", partitions_def=collections_partitions,
                blocking=False,
                description="WARN when the registry's cross-encoder did not load: a fallback source reranked, or "
                            "none did and results keep retrieval order (reason: the first load error)")
def cross_encoder_loaded(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    record = latest_materialization(context, RERANKED_KEY)
    if record is None:
        return _missing(RERANKED_KEY, context.partition_key)
    scorer = str(_value(record, "scorer") or "")
    metadata = {"scorer": scorer}
    if not _value(record, "rerank_fallback_applied"):
        executed = bool(_value(record, "rerank_executed"))
        return dg.AssetCheckResult(passed=True, metadata=metadata,
                                   description=f"reranked by {scorer}" if executed else f"rerank off: {scorer}")
    reason = _value(record, "rerank_fallback_reason") or "the registry's reranker could not be loaded"
    source = _value(record, "reranker_source")
    what = (f"fallback reranker {source!r} used" if source and _value(record, "rerank_executed")
            else "no cross-encoder could be loaded: results keep retrieval order")
    return dg.AssetCheckResult(passed=False, severity=WARN, metadata=metadata, description=f"{what}; {reason}")


@dg.asset_check(asset=RERANKED_KEY, name="hybrid_weights_tuned", partitions_def=collections_partitions,
                blocking=False,
                description="WARN when the hybrid dense/sparse weights stayed at their documented defaults "
                            "because too few queries with gold chunks could tune them (a default the "
                            "cross-validated gate kept passes)")
def hybrid_weights_tuned(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    record = latest_materialization(context, RERANKED_KEY)
    if record is None:
        return _missing(RERANKED_KEY, context.partition_key)
    weights = _value(record, "hybrid_weights")
    tuned = _value(record, "hybrid_tuned")
    metadata = {"weights": str(weights or "")}
    if tuned is None or not weights or "," not in str(weights):  # one candidate system: nothing to weigh
        return dg.AssetCheckResult(passed=True, metadata=metadata,
                                   description="one candidate system (dense only): no hybrid weights to tune")
    if tuned:
        return dg.AssetCheckResult(passed=True, metadata=metadata, description=f"weights tuned: {weights}")
    if _value(record, "hybrid_gate_ran"):
        return dg.AssetCheckResult(passed=True, metadata=metadata,
                                   description=str(_value(record, "hybrid_reason") or f"default kept: {weights}"))
    return dg.AssetCheckResult(passed=False, severity=WARN, metadata=metadata,
                               description=str(_value(record, "hybrid_reason") or "hybrid weights left at defaults"))


DEGRADED_CHECKS = [sparse_stage_enabled, cross_encoder_loaded, hybrid_weights_tuned]
