"""A sensor that turns new collection folders under the data root into partitions and runs them."""


import dagster as dg

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
               description="Adds a partition for every new folder under the data root and materializes it.")
    def collection_folder_sensor(context: dg.SensorEvaluationContext, paths: PathsResource) -> dg.SensorResult:
        added, unusable = new_collections(context.instance, paths)
        lines = [skipped_folder_line(folder, reason) for folder, reason in unusable]
        for line in lines:  # one line each, so every skipped folder can be found in the log
            context.log.warning(line)
        skipped = f"skipped {len(lines)} folder(s): " + "; ".join(lines) if lines else ""
        if not added:
            return dg.SensorResult(skip_reason="; ".join(filter(None, ["no new collection folders", skipped])))
        context.log.info(f"new collections: {added}")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=name, run_key=f"collection:{name}") for name in added],
            dynamic_partitions_requests=[collections_partitions.build_add_request(added)],
        )

    return collection_folder_sensor
