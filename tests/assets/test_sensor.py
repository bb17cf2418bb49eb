"""The collection sensor: a new folder under the data root becomes a partition and a run; known ones skip."""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.observe import observe  # what the UI's "Observe" runs (no public alias in 1.13)
import pytest

from rag_clean_assets.definitions import EMBED_JOB_NAME
from rag_clean_assets.observe import (COLLECTION_FILES, collection_files, collection_version, observe_collections,
                                      recorded_version)
from rag_clean_assets.partitions import COLLECTIONS_PARTITION
from rag_clean_assets.versions import DATA_VERSION_TAG
from rag_clean_assets.sensors import build_collection_sensor
from resources.paths import PathsResource


@pytest.fixture
def sensor():
    job = dg.define_asset_job(EMBED_JOB_NAME, selection=dg.AssetSelection.all())
    return build_collection_sensor(job)


def _evaluate(sensor, instance, data_root):
    # The storage root (folder-hash cache) beside the data root, never inside it (it would be a collection).
    storage = data_root.parent / f"{data_root.name}-storage"
    context = dg.build_sensor_context(instance=instance, resources={
        "paths": PathsResource(data_root=str(data_root), storage_root=str(storage))})
    return sensor(context)


def test_new_folder_gives_partition_request_and_run(sensor, tmp_path):
    (tmp_path / "alpha").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray.txt").write_text("not a collection")
    with dg.instance_for_test() as instance:
        result = _evaluate(sensor, instance, tmp_path)
        assert isinstance(result, dg.SensorResult)
        assert [(r.partition_key, r.run_key) for r in result.run_requests] == [("alpha", "collection:alpha")]
        [request] = result.dynamic_partitions_requests
        assert isinstance(request, dg.AddDynamicPartitionsRequest)
        assert (request.partitions_def_name, list(request.partition_keys)) == (COLLECTIONS_PARTITION, ["alpha"])


def test_known_folder_is_skipped_and_only_new_ones_requested(sensor, tmp_path):
    (tmp_path / "alpha").mkdir()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(COLLECTIONS_PARTITION, ["alpha"])
        result = _evaluate(sensor, instance, tmp_path)
        assert not result.run_requests and not result.dynamic_partitions_requests
        assert result.skip_reason and "no new collection folders" in result.skip_reason.skip_message

        (tmp_path / "beta").mkdir()
        result = _evaluate(sensor, instance, tmp_path)
        assert [r.partition_key for r in result.run_requests] == ["beta"]
        assert list(result.dynamic_partitions_requests[0].partition_keys) == ["beta"]


def test_missing_data_root_skips(sensor, tmp_path):
    with dg.instance_for_test() as instance:
        result = _evaluate(sensor, instance, tmp_path / "absent")
        assert not result.run_requests and result.skip_reason is not None


def test_folder_with_unusable_name_is_reported(sensor, tmp_path):
    (tmp_path / "bad name").mkdir()
    with dg.instance_for_test() as instance:
        result = _evaluate(sensor, instance, tmp_path)
        assert not result.run_requests
        assert "bad name" in (result.skip_reason.skip_message if result.skip_reason else "")


def test_edited_known_folder_is_observed_once(sensor, tmp_path):
    """A known collection whose files changed gets one collection_files observation (its new folder
    version); an unchanged one gets none, so it neither goes stale nor triggers anything."""
    data = tmp_path / "data"
    for name in ("alpha", "beta"):
        (data / name).mkdir(parents=True)
        (data / name / "doc.md").write_text(f"# {name}\n\ntext\n")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(COLLECTIONS_PARTITION, ["alpha", "beta"])
        first = _evaluate(sensor, instance, data)  # never observed: both recorded
        assert sorted(e.partition for e in first.asset_events) == ["alpha", "beta"]
        for event in first.asset_events:
            instance.report_runless_asset_event(event)  # what the daemon does with them
        assert not _evaluate(sensor, instance, data).asset_events

        (data / "beta" / "doc.md").write_text("# beta\n\nedited text\n")
        edited = _evaluate(sensor, instance, data)
        assert [(e.asset_key, e.partition) for e in edited.asset_events] == [(COLLECTION_FILES, "beta")]
        assert edited.asset_events[0].tags[DATA_VERSION_TAG] != first.asset_events[1].tags[DATA_VERSION_TAG]
        assert not edited.run_requests


def test_observing_collection_files_records_every_partition(tmp_path):
    """The UI's "Observe" on collection_files: one data version per partition, equal to the sensor's."""
    data = tmp_path / "data"
    for name in ("alpha", "beta"):
        (data / name).mkdir(parents=True)
        (data / name / "doc.md").write_text(f"# {name}\n\ntext\n")
    paths = PathsResource(data_root=str(data), storage_root=str(tmp_path / "storage"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(COLLECTIONS_PARTITION, ["alpha", "beta"])
        assert observe([collection_files], instance=instance, resources={"paths": paths}).success
        for name in ("alpha", "beta"):
            assert recorded_version(instance, name) == collection_version(paths, name).digest
        assert observe_collections(instance, paths) == []  # nothing changed since
