"""Automation, on by default (opt out: RAG_CLEAN_AUTOMATION=0): the daemon rematerializes what changed,
nothing else. Without a daemon (`dagster-webserver` alone, `dagster asset materialize`) nothing runs by
itself; the unsynced marks (rag_clean_assets/staleness.py) and "Materialize unsynced" remain.

Every asset gets one condition, `changed_inputs_or_code`: requested for a partition when

- one of its inputs has a new data version (for `chunks`/`queries`: a new `collection_files` observation,
  which the sensor records only when the folder's content changed), or its code version changed (a
  dense model's registry entry is part of that asset's code version), or an input will be requested on
  this same tick (so an edit becomes one run of the partition's affected assets, not one run per level);
- and it is materialized already (new collections are the sensor's: it adds the partition and runs it),
  no input is missing and nothing involved is in progress.

An input updated by a run that also materialized this asset does not count again (the
`executed_with_root_target` filter, as in Dagster's `eager()`), so one edit is one run. Other
partitions are untouched: conditions are evaluated per partition.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import dagster as dg

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.settings import process_setting

AUTOMATION_SENSOR = "rag_clean_automation"


def automation_enabled(environ: Mapping[str, str] | None = None) -> bool:
    return process_setting("automation", environ)


def changed_inputs_or_code() -> dg.AutomationCondition:
    AC = dg.AutomationCondition
    input_changed = AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("new data version")
        | AC.will_be_requested()
    ).with_label("an input changed")
    return (
        (input_changed | AC.code_version_changed()).since_last_handled()
        & ~AC.missing()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("changed_inputs_or_code")


def with_automation(assets: Iterable) -> list:
    """The assets with the condition on every materializable one (the observable collection_files unchanged)."""
    condition = changed_inputs_or_code()
    out = []
    for asset in assets:
        if isinstance(asset, dg.AssetsDefinition) and asset.is_materializable:
            asset = asset.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=condition))
        out.append(asset)
    return out


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR, target=dg.AssetSelection.all(), minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING, emit_backfills=False,  # plain runs, one per partition
        description=f"Requests one run per collection whose files, inputs or code changed (off: {BY_KEY['automation'].env}=0).")
