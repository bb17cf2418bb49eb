"""Shared fixtures: offline mode and the tiny random models (built once per test session)."""

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

from tiny_models import build_all, write_tiny_registry  # noqa: E402


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
def searchable_sample(tmp_path_factory, tiny_registry_path):
    """The bundled sample materialized once per session with the tiny models (reranked and its vector index),
    shared by the search tests of every layer. The caller's settings are kept out while it materializes."""
    from pipeline_helpers import materialize_sample

    root = tmp_path_factory.mktemp("searchable_sample")
    keys = ("EMBEDDER_ENABLE_SPARSE", "EMBEDDER_ENABLE_RERANK", "EMBEDDER_SPARSE_MODELS", "RAG_CLEAN_FORCE_CPU",
            "EMBEDDER_CONFIG_FILE")
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ["EMBEDDER_CONFIG_FILE"] = str(root / "absent-config.json")
    try:
        pipeline = materialize_sample(root, tiny_registry_path)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return pipeline
