"""One host with several GPUs: the multiprocess executor by RAG_CLEAN_EXECUTOR, and a `gpu` pool
limit of N written by init-home and read back by the Dagster instance."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from rag_clean_assets import collections
from rag_clean_assets.definitions import EMBED_JOB_NAME, build_definitions, default_executor


@pytest.mark.parametrize("value, expected", [("multiprocess", dg.multiprocess_executor),
                                             ("in_process", dg.in_process_executor),
                                             ("", dg.in_process_executor)])
def test_executor_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", value)
    assert default_executor() is expected


def test_unset_is_in_process_and_a_typo_is_refused(monkeypatch):
    monkeypatch.delenv("RAG_CLEAN_EXECUTOR", raising=False)
    assert default_executor() is dg.in_process_executor
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "multiprocesss")
    with pytest.raises(ValueError, match="RAG_CLEAN_EXECUTOR='multiprocesss': not one of"):
        default_executor()


def test_the_job_runs_on_the_multiprocess_executor(monkeypatch):
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "multiprocess")
    job = build_definitions().resolve_job_def(EMBED_JOB_NAME)
    assert job.executor_def is dg.multiprocess_executor


@pytest.mark.parametrize("n", [1, 4])
def test_init_home_gpu_pool_limit(tmp_path, monkeypatch, n):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert collections.main(["init-home", "--gpu-pool-limit", str(n)]) == 0
    config = yaml.safe_load((tmp_path / "dagster.yaml").read_text(encoding="utf-8"))
    assert config["concurrency"]["pools"]["default_limit"] == n
    # The instance reads it: the "gpu" pool (no explicit limit of its own) gets N slots.
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == n
    # A file init-home wrote follows a new limit; one the user owns (marker line removed) is kept.
    assert collections.main(["init-home", "--gpu-pool-limit", "7"]) == 0
    path = tmp_path / "dagster.yaml"
    assert yaml.safe_load(path.read_text())["concurrency"]["pools"]["default_limit"] == 7
    path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    assert collections.main(["init-home", "--gpu-pool-limit", str(n)]) == 0
    assert yaml.safe_load(path.read_text())["concurrency"]["pools"]["default_limit"] == 7


def test_init_home_without_cuda_sets_no_gpu_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("RAG_CLEAN_FORCE_CPU", "1")
    monkeypatch.delenv("RAG_CLEAN_GPU_POOL_LIMIT", raising=False)
    assert collections.main(["init-home"]) == 0
    assert "default_limit" not in yaml.safe_load((tmp_path / "dagster.yaml").read_text())["concurrency"]["pools"]


def test_init_home_refuses_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=">= 1"):
        collections.init_home(0)
