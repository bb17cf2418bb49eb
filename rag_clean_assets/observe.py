"""`collection_files`: the collection folders as an observable source asset, so Dagster sees edits.

`chunks` reads files Dagster does not manage. Without this asset Dagster learns that a folder changed
only when `chunks` reruns; with it, an observation records each partition's folder version
(rag_clean.chunking.folder_version: sha256 over relative paths and file digests) and Dagster's staleness
does the rest: a changed version makes that partition's `chunks` (and `queries`, which reads the
folder's queries.jsonl) stale, and, once `chunks` reruns with new content, everything below it.

Who observes:
- the `collection_folder_sensor` on every tick, recording an observation only for partitions whose
  version differs from the last one recorded (an unchanged folder adds no events, and so triggers nothing);
- `chunks` itself, before it reads the folder, so each materialization's provenance names the exact
  folder version it read and a no-op rerun leaves the graph in sync;
- the UI's "Observe" button on `collection_files` (every partition).
"""

from __future__ import annotations


import dagster as dg
from dagster._core.definitions.external_asset import create_external_asset_from_source_asset

from rag_clean.chunking.folder_version import FolderVersion, folder_version
from rag_clean_assets.partitions import COLLECTIONS_PARTITION, collections_partitions
from rag_clean_assets.versions import DATA_VERSION_TAG
from resources.paths import PathsResource

COLLECTION_FILES = dg.AssetKey("collection_files")



def collection_version(paths: PathsResource, collection: str) -> FolderVersion:
    return folder_version(paths.collection_dir(collection), paths.layout().folder_hash_cache_file(collection),
                          root=paths.data_dir())


def recorded_version(instance: dg.DagsterInstance, collection: str) -> str | None:
    """The folder version last recorded for the partition (None: never observed)."""
    record = instance.get_latest_data_version_record(COLLECTION_FILES, True, collection)
    observation = record.asset_observation if record is not None else None
    return (observation.tags or {}).get(DATA_VERSION_TAG) if observation is not None else None


def observation(collection: str, version: FolderVersion) -> dg.AssetObservation:
    return dg.AssetObservation(asset_key=COLLECTION_FILES, partition=collection,
                               tags={DATA_VERSION_TAG: version.digest},
                               metadata={"files": version.files, "files_hashed": version.hashed})


def changed_observations(instance: dg.DagsterInstance, paths: PathsResource,
                         collections: list[str]) -> tuple[list[dg.AssetObservation], list[str]]:
    """(observations of the partitions whose folder version changed, [problem lines]). A folder that
    vanished or cannot be read is reported, not observed: its previous version stays."""
    events, problems = [], []
    for name in collections:
        try:
            version = collection_version(paths, name)
        except Exception as exc:  # one bad folder must not stop the others' observations
            problems.append(f"collection {name!r}: folder not observed: {exc}")
            continue
        if version.digest != recorded_version(instance, name):
            events.append(observation(name, version))
    return events, problems


def observe_collections(instance: dg.DagsterInstance, paths: PathsResource,
                        collections: list[str] | None = None) -> list[str]:
    """Record an observation for every partition whose folder changed; returns their names.
    What the sensor does, for the CLI and tests (no daemon needed)."""
    names = collections if collections is not None else instance.get_dynamic_partitions(COLLECTIONS_PARTITION)
    events, problems = changed_observations(instance, paths, list(names))
    for problem in problems:
        raise ValueError(problem)
    for event in events:
        instance.report_runless_asset_event(event)
    return [e.partition for e in events]


def record_read_version(context: dg.AssetExecutionContext, paths: PathsResource) -> FolderVersion:
    """Called by `chunks` before it reads the folder: record the version it is about to read (if it is
    not the one on record), and make this step's provenance point at that observation.

    Dagster fetches the input versions of a step before its body runs; the cached entry for
    `collection_files` is dropped so the materialization records this observation instead of an
    older one (else the first observation after the run would look like a change)."""
    collection = context.partition_key
    version = collection_version(paths, collection)
    if version.digest != recorded_version(context.instance, collection):
        context.instance.report_runless_asset_event(observation(collection, version))
        context.get_step_execution_context().wipe_input_asset_version_info(COLLECTION_FILES)
    return version


@dg.observable_source_asset(
    key=COLLECTION_FILES,
    partitions_def=collections_partitions,
    group_name="ingest",
    description="The files of each collection folder under the data root. Its data version per partition is a "
                "digest of the relative paths and sha256 of every file chunks reads (hidden entries skipped); "
                "observed by the collection sensor, so an edit shows that collection's chunks as stale.",
)
def _collection_files(context, paths: PathsResource) -> dg.DataVersionsByPartition:
    versions = {}
    for name in context.instance.get_dynamic_partitions(COLLECTIONS_PARTITION):
        try:
            versions[name] = dg.DataVersion(collection_version(paths, name).digest)
        except Exception as exc:
            context.log.warning(f"collection {name!r}: folder not observed: {exc}")
    return dg.DataVersionsByPartition(versions)


# As an AssetsDefinition (what Definitions makes of a source asset anyway), so code that walks the asset
# list (`.keys`, `.specs`, `is_materializable`) treats it like every other asset.
collection_files: dg.AssetsDefinition = create_external_asset_from_source_asset(_collection_files)
