"""Asset tests: materialize the real graph with tiny random models into a temporary storage root."""

from __future__ import annotations


import pytest

from pipeline_helpers import Pipeline, write_collection


@pytest.fixture
def pipeline(tmp_path, tiny_registry_path, clean_settings) -> Pipeline:
    data_root = tmp_path / "data"
    write_collection(data_root)
    return Pipeline(data_root, tmp_path / "storage", tiny_registry_path, tmp_path / "locks")
