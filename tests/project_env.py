"""The environment for running the project's CLIs in a subprocess, confined to one temporary folder.

Shared by the e2e tests and benchmarks/bench_concurrent_collections.py: the caller's EMBEDDER_*,
RAG_CLEAN_* and DAGSTER_* settings never leak in, and every root (instance, data, storage, GPU locks)
lies under `root`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's settings (resources/settings.py and every RAG_CLEAN_* knob): a caller's value would change a run.
SETTING_PREFIXES = ("EMBEDDER_", "RAG_CLEAN_")
# Set for the whole test session by tests/conftest.py (the query key stays out of the real ~/.config).
SESSION_SETTINGS = ("RAG_CLEAN_QUERY_KEY_FILE",)


def project_env(root: Path, registry: Path, data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith((*SETTING_PREFIXES, "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(root / "home"), RAG_CLEAN_MODEL_REGISTRY=str(registry),
               RAG_CLEAN_DATA_ROOT=str(data), RAG_CLEAN_STORAGE_ROOT=str(root / "storage"),
               RAG_CLEAN_GPU_LOCK_DIR=str(root / "locks"), EMBEDDER_CONFIG_FILE=str(root / "absent.json"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])), **extra)
    return env


# `collections init-home` then `collections add ...`: the CLI's own main(), in one process (one import of
# Dagster instead of two; each costs seconds on a loaded 2-core machine).
_INIT = ("import sys; from rag_clean_assets.collections import main; "
         "sys.exit(main(['init-home']) or main(['add', *sys.argv[1:]]))")


def init_instance(env: dict[str, str], cwd: Path, collections: list[str], timeout: float = 120) -> None:
    """`collections init-home`, then `collections add` the given partitions."""
    proc = subprocess.run([sys.executable, "-c", _INIT, *collections], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"init-home / add {collections} exited {proc.returncode}:\n{proc.stderr[-3000:]}"


def clear_settings(monkeypatch, root: Path) -> None:
    """The in-process counterpart of project_env: the caller's EMBEDDER_* / RAG_CLEAN_* settings leave this
    process's environment (the session's own stay) and the config file points at a missing one under `root`."""
    for key in [k for k in os.environ if k.startswith(SETTING_PREFIXES) and k not in SESSION_SETTINGS]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EMBEDDER_CONFIG_FILE", str(root / "absent-config.json"))
