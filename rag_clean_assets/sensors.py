"""A sensor that turns new collection folders under the data root into partitions and runs them, and
observes the known ones (rag_clean_assets/observe.py) so edits show as stale."""


import dagster as dg

from rag_clean_assets.observe import changed_observations
from rag_clean_assets.partitions import COLLECTIONS_PARTITION, collections_partitions
from resources.paths import PathsResource


def new_collections(instance: dg.DagsterInstance, paths: PathsResource) -> tuple[list[str], list[tuple[str, str]]]:
    """(new usable collections, [(folder, reason)] for folders that cannot be collections)."""
    known = set(instance.get_dynamic_partitions(COLLECTIONS_PARTITION))
    names, unusable = paths.scan_collections()
    return [name for name in names if name not in known], unusable


def skipped_folder_line(folder: str, reason: str) -> str:
    return f"skipped folder {folder!r} under the data root: {reason}"


def build_collection_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Adds a partition for every new folder under the data root and materializes it; records "
                           "a collection_files observation for every known collection whose files changed, so its "
                           "chunks (and what follows) show as stale.")
    def collection_folder_sensor(context: dg.SensorEvaluationContext, paths: PathsResource) -> dg.SensorResult:
        added, unusable = new_collections(context.instance, paths)
        lines = [skipped_folder_line(folder, reason) for folder, reason in unusable]
        for line in lines:  # one line each, so every skipped folder can be found in the log
            context.log.warning(line)
        # New partitions are observed by their first chunks step; the known ones here.
        known = [c for c in context.instance.get_dynamic_partitions(COLLECTIONS_PARTITION) if c not in added]
        observations, problems = changed_observations(context.instance, paths, known)
        for problem in problems:
            context.log.warning(problem)
        if observations:
            context.log.info(f"collections whose files changed: {[o.partition for o in observations]}")
        skipped = f"skipped {len(lines)} folder(s): " + "; ".join(lines) if lines else ""
        if not added:
            changed = f"{len(observations)} collection(s) changed (observed)" if observations else ""
            return dg.SensorResult(skip_reason="; ".join(filter(None, ["no new collection folders", changed, skipped])),
                                   asset_events=observations)
        context.log.info(f"new collections: {added}")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=name, run_key=f"collection:{name}") for name in added],
            dynamic_partitions_requests=[collections_partitions.build_add_request(added)],
            asset_events=observations,
        )

    return collection_folder_sensor
