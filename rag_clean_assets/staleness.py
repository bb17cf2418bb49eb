"""What is out of date in one collection, as Dagster's stale-status resolver reports it, everywhere.

Dagster 1.13's resolver has two gaps that hide an edited collection in the UI:

- it calls an asset partition STALE only when one of its *direct* inputs has a new data version or its
  code version changed: after a folder edit `chunks` and `queries` are unsynced, but the dense, fused,
  sparse and reranked partitions below them look in sync until `chunks` has rerun;
- for a partitioned asset asked without a partition (the asset graph, the catalog, and "Materialize
  unsynced", which all ask that way) it answers FRESH, whatever its partitions are.

`install()` closes both, in the resolver class itself, so the webserver, the daemon and the CLI agree:
a partition with an out-of-date input partition (same collection) is STALE with the cause "has an
out-of-date dependency", whose children lead to the root cause (e.g. `collection_files` has a new data
version); and a partitioned asset asked without a partition is STALE when any of its partitions is,
with those partitions' causes. The webserver and the daemon load it through the instance's
event log storage class (rag_clean_assets/instance.py); code servers and the CLI through definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg
from dagster._core.definitions.data_version import (
    NULL_DATA_VERSION,
    CachingStaleStatusResolver,
    StaleCause,
    StaleCauseCategory,
    StaleStatus,
)
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.loader import LoadingContext
from dagster._utils.cached_method import cached_method

PROPAGATED = "has an out-of-date dependency"
# An asset asked without a partition looks at this many partitions at most: the graph stays quick.
MAX_PARTITIONS = 500

_DAGSTER_STATUS = CachingStaleStatusResolver._get_status
_DAGSTER_CAUSES = CachingStaleStatusResolver._get_stale_causes


def _partitions(resolver: CachingStaleStatusResolver, asset) -> list[str]:
    keys = asset.partitions_def.get_partition_keys(dynamic_partitions_store=resolver._instance)
    return list(keys)[:MAX_PARTITIONS]


@cached_method
def _status_any_partition(self: CachingStaleStatusResolver, key: AssetKeyPartitionKey) -> StaleStatus:
    asset = self.asset_graph.get(key.asset_key)
    if asset.is_partitioned and not key.partition_key and asset.is_materializable:
        statuses = {self._get_status(key=AssetKeyPartitionKey(key.asset_key, p)) for p in _partitions(self, asset)}
        return StaleStatus.STALE if StaleStatus.STALE in statuses else StaleStatus.FRESH
    return _DAGSTER_STATUS(self, key=key)


@cached_method
def _causes_with_upstream(self: CachingStaleStatusResolver, key: AssetKeyPartitionKey) -> list[StaleCause]:
    asset = self.asset_graph.get(key.asset_key)
    if asset.is_partitioned and not key.partition_key and asset.is_materializable:
        return [c for p in _partitions(self, asset)
                for c in self._get_stale_causes(key=AssetKeyPartitionKey(key.asset_key, p))]
    causes = list(_DAGSTER_CAUSES(self, key=key))
    if not key.partition_key or asset.is_external or not asset.is_materializable or \
                    self._get_current_data_version(key=key) == NULL_DATA_VERSION:  # never materialized: missing
        return causes
    direct = {c.dependency for c in causes if c.dependency is not None}
    for dep in self._get_partition_dependencies(key=key):
        if dep in direct or dep.partition_key != key.partition_key or self.asset_graph.get(dep.asset_key).is_external:
            continue
        upstream = self._get_stale_causes(key=dep)
        if upstream:
            causes.append(StaleCause(key, StaleCauseCategory.DATA, PROPAGATED, dep, upstream))
    return sorted(causes, key=lambda cause: cause.sort_key)


def install() -> None:
    """Put the two fixes on Dagster's resolver class (idempotent)."""
    CachingStaleStatusResolver._get_status = _status_any_partition
    CachingStaleStatusResolver._get_stale_causes = _causes_with_upstream


install()


class _Loading(LoadingContext):
    """The minimal loading context the resolver needs outside a webserver request."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance, self._loaders = instance, {}

    @property
    def loaders(self):
        return self._loaders

    @property
    def instance(self):
        return self._instance


@dataclass
class AssetStatus:
    status: str                     # "fresh", "stale", "upstream stale" or "missing"
    dagster: str                    # Dagster's own StaleStatus value (FRESH / STALE / MISSING)
    causes: list[str] = field(default_factory=list)


def resolver(instance: dg.DagsterInstance, asset_graph) -> CachingStaleStatusResolver:
    return CachingStaleStatusResolver(instance, asset_graph, _Loading(instance))


def partition_status(instance: dg.DagsterInstance, defs: dg.Definitions, partition: str) -> dict[str, AssetStatus]:
    """Every materializable asset of the graph for one collection, keyed by its user string."""
    graph = defs.resolve_asset_graph()
    stale = resolver(instance, graph)
    keys = [k for k in graph.toposorted_asset_keys if graph.get(k).is_materializable]
    out: dict[str, AssetStatus] = {}
    for key in keys:
        raw = stale.get_status(key, partition)
        causes = stale.get_stale_causes(key, partition)
        lines = [f"{c.asset_key.to_user_string()}: {c.reason}"
                 + (f" ({c.dependency.asset_key.to_user_string()})" if c.dependency else "") for c in causes]
        if raw == StaleStatus.MISSING:
            status = "missing"
        elif raw == StaleStatus.FRESH:
            status = "fresh"
        else:  # stale only through an input partition that is itself out of date: it changes when that reruns
            status = "upstream stale" if all(c.reason == PROPAGATED for c in causes) else "stale"
        out[key.to_user_string()] = AssetStatus(status, raw.value, lines)
    return out
