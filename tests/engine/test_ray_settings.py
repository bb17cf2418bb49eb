"""The Ray settings and plan (no cluster): off by default, EMBEDDER_RAY_* and run config set them with
provenance, bad values fail with the source, and a missing Ray names the extra to install."""

from __future__ import annotations

import hashlib
import sys

import pyarrow as pa
import pytest

from rag_clean.distributed.ray_encode import RayUnavailableError, connect
from rag_clean.config.plan import RayPlan, build_run_plan
from rag_clean.config.settings import EmbedderSettings, SettingsError, resolve_settings
from stage_helpers import dense, sparse
from resources.settings import EmbedderSettingsResource


def _resolve(tmp_path, environ=None, **overrides):
    return resolve_settings(config_file=None, dotenv_file=tmp_path / "none.env", environ=environ or {},
                            overrides=overrides or None)


def test_ray_is_off_by_default(registry, tmp_path):
    settings = _resolve(tmp_path)
    assert (settings.ray_address, settings.ray_shard_rows, settings.ray_actors) == ("", 4096, 2)
    assert build_run_plan(registry, settings).ray is None


def test_ray_settings_from_env_reach_the_plan(registry, tmp_path):
    settings = _resolve(tmp_path, {"EMBEDDER_RAY_ADDRESS": "ray://head:10001", "EMBEDDER_RAY_SHARD_ROWS": "128",
                                   "EMBEDDER_RAY_ACTORS": "8"})
    assert build_run_plan(registry, settings).ray == RayPlan(address="ray://head:10001", shard_rows=128, actors=8)
    assert {settings.provenance[k] for k in ("ray_address", "ray_shard_rows", "ray_actors")} == {"override via env"}


def test_ray_address_from_run_config(tmp_path):
    resolved = EmbedderSettingsResource(dotenv_file=str(tmp_path / "none.env"), ray_address="local", ray_actors=1).resolve()
    assert (resolved.ray_address, resolved.ray_actors) == ("local", 1)
    assert resolved.provenance["ray_address"] == "run config"


@pytest.mark.parametrize("env", [{"EMBEDDER_RAY_ADDRESS": "somewhere"}, {"EMBEDDER_RAY_ACTORS": "0"},
                                 {"EMBEDDER_RAY_SHARD_ROWS": "many"}])
def test_bad_ray_settings_name_their_source(tmp_path, env):
    with pytest.raises(SettingsError, match=rf"^{next(iter(env))}="):
        _resolve(tmp_path, env)


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now fails as if it were not installed


def _chunks(n=3):
    texts = [f"gpu driver {i}" for i in range(n)]
    return pa.table({"chunk_id": [f"c{i}" for i in range(n)], "text": texts,
                     "content_hash": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
                     "metadata_json": ["{}"] * n})


def test_missing_ray_names_the_extra(no_ray, registry, tmp_path):
    plan = RayPlan(address="local")
    with pytest.raises(RayUnavailableError, match=r"rag-clean\[ray\]"):
        connect(plan)
    with pytest.raises(RayUnavailableError, match="EMBEDDER_RAY_ADDRESS"):
        dense(registry.get("tiny-a"), _chunks(), tmp_path / "d.arrow", ray_address="local")
    # A configuration error, not a model failure: the sparse stage does not fall back to metadata.
    with pytest.raises(RayUnavailableError):
        sparse([registry.get("tiny-splade")], _chunks(), root=tmp_path, ray_address="local")


def test_default_path_does_not_need_ray(no_ray, registry, tmp_path):
    writer, record = dense(registry.get("tiny-a"), _chunks(), tmp_path / "d.arrow")
    writer.abort()
    assert record.computed == 3 and EmbedderSettings().ray_address == ""
