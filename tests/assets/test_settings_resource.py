"""The Dagster side of the one settings declaration: the settings resource is generated from it, the
definitions are built by a function (importing them reads no setting, loads no registry, hashes no
weights), and RAG_CLEAN_FORCE_CPU means the same to the pool as to the lease. Issue 19 item 4, issue 22
item 6."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from rag_clean.config.declaration import run_settings
from rag_clean.config.settings import EmbedderSettings, SettingsError
from rag_clean.storage import digests
from rag_clean_assets.instance import gpu_pool_limit, visible_gpu_count
from resources.settings import EmbedderSettingsResource

REPO = Path(__file__).resolve().parents[2]
EXTRA_FIELDS = {"config_file", "dotenv_file", "override_source"}


def test_the_resource_has_one_field_per_declared_setting_with_its_doc():
    fields = EmbedderSettingsResource.model_fields
    assert set(fields) - EXTRA_FIELDS == {s.key for s in run_settings(retired=True)}
    assert all(fields[s.key].description == s.doc for s in run_settings(retired=True))


def test_run_config_names_keep_working_and_win(tmp_path):
    resolved = EmbedderSettingsResource(dotenv_file=str(tmp_path / "none.env"), rrf_k=9,
                                        sparse_models=["tiny-splade"], exclusive_ensemble=True).resolve()
    assert isinstance(resolved, EmbedderSettings)
    assert (resolved.rrf_k, resolved.provenance["rrf_k"]) == (9, "run config")
    assert resolved.sparse_models == ("tiny-splade",) and len(resolved.notes) == 1


def test_run_config_values_go_through_the_strict_parser(tmp_path):
    with pytest.raises(SettingsError, match=r"^run config: hybrid_fusion='sum': not one of 'weighted', 'rrf'"):
        EmbedderSettingsResource(dotenv_file=str(tmp_path / "none.env"), hybrid_fusion="sum").resolve()


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "ON"])
def test_force_cpu_means_no_gpu_for_the_pool_as_for_the_lease(value):
    """instance.visible_gpu_count knew 1/true/yes; `on` left the pool counting GPUs the lease never grants."""
    env = {"RAG_CLEAN_FORCE_CPU": value, "RAG_CLEAN_GPU_DEVICES": "0,1"}
    assert visible_gpu_count(env) == 0 and gpu_pool_limit(env) is None


def test_importing_the_definitions_reads_no_setting():
    """A bad RAG_CLEAN_* value used to crash the import (defs were built there); now only building does."""
    env = {"RAG_CLEAN_EXECUTOR": "bogus", "RAG_CLEAN_MODEL_REGISTRY": "/nonexistent/models.toml",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    code = ("import rag_clean_assets.definitions as d, dagster as dg\n"
            "from dagster.components.definitions import LazyDefinitions\n"
            "assert isinstance(d.defs, LazyDefinitions)\n"
            "try:\n    d.defs()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # Building checks every RAG_CLEAN_* value first: the load fails naming the variable, before any step.
    assert out.stdout.strip() == ("SettingsError RAG_CLEAN_EXECUTOR='bogus': not one of 'in_process', "
                                  "'multiprocess', 'k8s'")


def test_building_the_definitions_hashes_no_weights(tiny_registry_path, monkeypatch):
    """Code versions come from the registry entries as declared, not from hashing every weight file."""
    hashed = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: hashed.append(p) or real(p))
    from rag_clean_assets.definitions import build_definitions

    defs = build_definitions(str(tiny_registry_path))
    assert isinstance(defs, dg.Definitions) and defs.resolve_job_def("embed_collection") is not None
    assert hashed == []
