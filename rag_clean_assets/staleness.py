"""What is out of date in one collection, from Dagster's own stale-status resolver.

Dagster 1.13 calls an asset partition STALE when one of its *direct* inputs has a new data version or
its code version changed; it does not propagate further. So after a folder edit the UI marks
`chunks` (and `queries`) unsynced, and the rest of the partition becomes unsynced once `chunks`
has rerun with new rows. `partition_status` adds the propagation Dagster leaves out: an asset with a
stale ancestor in the same partition is "upstream stale", i.e. it will change when that ancestor
reruns (what the automation condition requests in the same run).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContext


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
    for key in keys:  # topological: parents are decided before children
        raw = stale.get_status(key, partition)
        causes = [f"{c.asset_key.to_user_string()}: {c.reason}"
                  + (f" ({c.dependency_asset_key.to_user_string()})" if c.dependency_asset_key else "")
                  for c in stale.get_stale_causes(key, partition)]
        if raw == StaleStatus.MISSING:
            status = "missing"
        elif raw == StaleStatus.STALE:
            status = "stale"
        else:
            upstream = [p.to_user_string() for p in graph.get(key).parent_keys
                        if out.get(p.to_user_string()) and out[p.to_user_string()].status in ("stale", "upstream stale")]
            status = "upstream stale" if upstream else "fresh"
            causes += [f"upstream {name} is out of date" for name in upstream]
        out[key.to_user_string()] = AssetStatus(status, raw.value, causes)
    return out
