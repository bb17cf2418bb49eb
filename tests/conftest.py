"""Shared fixtures: offline mode, the tiny random models and their registry (built once per test session),
a clean settings environment, the one sample materialization the search tests read, one local Ray cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Let tests import the packages and `tests.tiny_models` without installing the project.
for _p in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# Set at import time too, so modules imported during collection already see offline mode.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from project_env import clear_settings  # noqa: E402
from tiny_models import build_all, write_tiny_registry  # noqa: E402


def pytest_collection_modifyitems(items):
    """Tests on the Ray cluster run last (stable order otherwise): the session's one cluster then lives only
    while they run, not through the rest of the suite on a 2-core machine."""
    items.sort(key=lambda item: "ray_cluster" in item.fixturenames)


@pytest.fixture(scope="session", autouse=True)
def _offline_hub():
    """No test may reach the model hub: it is unreachable here and slow elsewhere."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def _query_key_file(tmp_path_factory):
    """The keyed query hash creates its secret on first use: keep it out of the real ~/.config."""
    saved = os.environ.get("RAG_CLEAN_QUERY_KEY_FILE")
    os.environ["RAG_CLEAN_QUERY_KEY_FILE"] = str(tmp_path_factory.mktemp("query_key") / "query_key")
    yield
    if saved is None:
        os.environ.pop("RAG_CLEAN_QUERY_KEY_FILE", None)
    else:
        os.environ["RAG_CLEAN_QUERY_KEY_FILE"] = saved


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """Folder with tiny-a (32-d), tiny-b (48-d), tiny-splade, tiny-reranker, tiny-bge-m3."""
    return build_all(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_registry_path(tiny_models_dir, tmp_path_factory) -> Path:
    """models.toml naming the tiny models: 2 dense (32-d, 48-d), sparse and rerank, concat fusion."""
    return write_tiny_registry(tmp_path_factory.mktemp("tiny_registry"), tiny_models_dir)


@pytest.fixture(scope="session")
def registry(tiny_registry_path):
    """The tiny registry, loaded (a frozen Registry: tests share it)."""
    from rag_clean.config.registry import load_registry

    return load_registry(tiny_registry_path)


@pytest.fixture
def clean_settings(monkeypatch, tmp_path):
    """No EMBEDDER_* / RAG_CLEAN_* setting of the caller's shell reaches the test; the config file is absent."""
    clear_settings(monkeypatch, tmp_path)


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray cluster for the session: 2 CPUs (= 2 actors), a 200 MB object store, no dashboard.
    address="local" starts a new one even where a Ray cluster already runs on the machine (plain ray.init()
    would attach to that). Workers get this checkout of rag_clean the way `connect` ships it."""
    ray = pytest.importorskip("ray")
    from rag_clean.distributed import ray_encode

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False,
             logging_level="WARNING", runtime_env=ray_encode.job_runtime_env())
    yield ray
    ray_encode.shutdown_workers()  # warm workers belong to this cluster: none may outlive it
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_workers(ray_cluster):
    """The session's cluster, with no warm worker carried from one module into the next."""
    from rag_clean.distributed import ray_encode

    ray_encode.shutdown_workers()
    yield ray_cluster
    ray_encode.shutdown_workers()


@pytest.fixture(scope="session")
def searchable_sample(tmp_path_factory, tiny_registry_path):
    """The bundled sample materialized once per session with the tiny models (reranked and its vector index),
    shared by the search tests of every layer. The caller's settings are kept out while it materializes."""
    from pipeline_helpers import materialize_sample

    root = tmp_path_factory.mktemp("searchable_sample")
    with pytest.MonkeyPatch.context() as mp:
        clear_settings(mp, root)
        return materialize_sample(root, tiny_registry_path)
