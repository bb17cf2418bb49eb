"""On Kubernetes: the definitions with the k8s executor, and the pod every step would get.

The pod specs are built by dagster_k8s's own functions, as k8s_job_executor.launch_step does: the
run launcher's defaults (deploy/helm/values.yaml runK8sConfig) merged with the step's op tags
(get_user_defined_k8s_config), then construct_dagster_k8s_job. No cluster is needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

dagster_k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s is installed by scripts/bootstrap.sh")
from dagster._core.execution.api import create_execution_plan  # noqa: E402
from dagster_k8s.container_context import K8sContainerContext  # noqa: E402
from dagster_k8s.job import (  # noqa: E402
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)

from rag_clean.config.registry import load_registry  # noqa: E402
from rag_clean_assets import pods  # noqa: E402
from rag_clean_assets.definitions import EMBED_JOB_NAME, build_definitions, default_executor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "deploy" / "helm" / "values.yaml"
GPU = "nvidia.com/gpu"
# The chart renders runK8sConfig's top-level keys in snake case into the instance's run launcher config.
_CHART_KEYS = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
               "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobSpecConfig": "job_spec_config",
               "jobMetadata": "job_metadata"}


def _launcher_defaults() -> UserDefinedDagsterK8sConfig:
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    run_k8s = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    return UserDefinedDagsterK8sConfig.from_dict({_CHART_KEYS[k]: v for k, v in run_k8s.items()})


def _step_pod(step_tags: dict) -> "object":
    """The V1PodSpec k8s_job_executor would submit for a step with these tags."""
    context = K8sContainerContext(run_k8s_config=_launcher_defaults()).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags)))
    job_config = DagsterK8sJobConfig(job_image="registry.example.com/rag-clean:0.1.0",
                                     dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance")
    job = construct_dagster_k8s_job(job_config, args=["dagster", "api", "execute_step"], job_name="dagster-step-x",
                                    user_defined_k8s_config=context.run_k8s_config, component="step_worker")
    return job.spec.template.spec


def _plan_steps(monkeypatch, registry_path=None):
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "k8s")
    defs = build_definitions(str(registry_path) if registry_path else None)
    job = defs.resolve_job_def(EMBED_JOB_NAME)
    assert job.executor_def is dagster_k8s.k8s_job_executor
    return {step.key: step for step in create_execution_plan(job).steps}


def _check_step_keys(registry_path=None) -> set[str]:
    """Steps of asset checks (one op each), whatever checks the definitions have."""
    defs = build_definitions(str(registry_path) if registry_path else None)
    return {checks.op.name for checks in defs.asset_checks}


def _gpu_keys(registry) -> set[str]:
    dense = {f"dense_embeddings__{s.asset_name}" for s in registry.dense}
    return dense | {"sparse_vectors", "reranked"}


def test_k8s_executor_is_selected_and_imported_lazily(monkeypatch):
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "k8s")
    assert default_executor() is dagster_k8s.k8s_job_executor
    monkeypatch.setitem(sys.modules, "dagster_k8s", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match="needs dagster-k8s"):
        default_executor()
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "in_process")
    default_executor()  # other executors never import it


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_every_step_pod_gpu_steps_get_cards_cpu_steps_do_not(monkeypatch, tiny_registry_path, which):
    registry_path = tiny_registry_path if which == "tiny" else None
    steps = _plan_steps(monkeypatch, registry_path)
    check_keys = _check_step_keys(registry_path)
    gpu_keys = _gpu_keys(load_registry(str(registry_path) if registry_path else None))
    assert gpu_keys <= set(steps), sorted(steps)
    gpu_pod = pods.load_pod_config()["gpu_pod"]
    for key, step in steps.items():
        spec = _step_pod(dict(step.tags))
        (container,) = spec.containers
        limits = container.resources.limits or {}
        tolerations = [(t.key, t.operator, t.effect) for t in spec.tolerations or []]
        if key in gpu_keys:
            assert step.pool == "gpu", key
            assert limits[GPU] == str(gpu_pod["gpus"]), key
            assert limits["memory"] == gpu_pod["memory_limit"], key
            assert container.resources.requests["memory"] == gpu_pod["memory"], key
            assert spec.node_selector == gpu_pod["node_selector"], key
            assert (GPU, "Exists", "NoSchedule") in tolerations, key
        else:
            assert step.pool is None, key
            assert GPU not in limits and GPU not in (container.resources.requests or {}), key
            assert not spec.node_selector, key  # CPU pods stay off the tainted GPU nodes
            assert not tolerations, key
            # Small pods: CPU assets from [cpu_pod], asset checks (no tags) the run launcher's default.
            if pods.K8S_CONFIG_TAG in step.tags:
                assert container.resources.requests["memory"] == pods.load_pod_config()["cpu_pod"]["memory"], key
            else:
                assert key in check_keys, key
                assert container.resources.requests == _launcher_defaults().container_config["resources"]["requests"]


def test_cpu_assets_carry_the_cpu_pod(monkeypatch):
    steps = _plan_steps(monkeypatch)
    cpu_pod = pods.load_pod_config()["cpu_pod"]
    for key in ("chunks", "fused_embeddings", "queries", "exports"):
        resources = _step_pod(dict(steps[key].tags)).containers[0].resources
        assert resources.requests == {"cpu": cpu_pod["cpu"], "memory": cpu_pod["memory"]}, key
        assert resources.limits == {"cpu": cpu_pod["cpu_limit"], "memory": cpu_pod["memory_limit"]}, key


def test_tags_come_from_one_file(tmp_path, monkeypatch):
    """Another file (RAG_CLEAN_POD_CONFIG) changes every GPU asset at once: nothing is copied per asset."""
    config = tmp_path / "pods.toml"
    config.write_text('[gpu_pod]\ngpus = 2\nmemory = "80Gi"\nnode_selector = { pool = "h200" }\n'
                      '[cpu_pod]\ncpu = "250m"\n', encoding="utf-8")
    monkeypatch.setenv(pods.POD_CONFIG_ENV, str(config))
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "k8s")
    tags = pods.gpu_pod_tags()
    spec = _step_pod(tags)
    assert spec.containers[0].resources.limits[GPU] == "2"
    assert spec.node_selector == {"pool": "h200"}
    # The dense factory reads it when it builds the asset.
    from rag_clean_assets.assets.dense import build_dense_asset
    asset = build_dense_asset(load_registry().dense[0])
    assert json.loads(asset.op.tags[pods.K8S_CONFIG_TAG]) == json.loads(tags[pods.K8S_CONFIG_TAG])


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_local_runs_carry_no_pod_tags(monkeypatch, tiny_registry_path, executor):
    """The same definitions on one box: no step shows a Kubernetes pod spec in its op tags (deploy/pods.toml
    exists, but it is the k8s executor's); the k8s executor's steps do (test above)."""
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", executor)
    job = build_definitions(str(tiny_registry_path)).resolve_job_def(EMBED_JOB_NAME)
    steps = create_execution_plan(job).steps
    assert steps and not [s.key for s in steps if pods.K8S_CONFIG_TAG in s.tags]
    assert pods.gpu_pod_tags() == {} and pods.cpu_pod_tags() == {}
    assert pods.DEFAULT_POD_CONFIG.is_file()


def test_pod_config_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text('[gpu_pod]\ngpus = 1\ngpu_count = 2\n[cpu_pod]\n', encoding="utf-8")
    with pytest.raises(pods.PodConfigError, match="unknown keys"):
        pods.load_pod_config(bad)
    nogpu = tmp_path / "nogpu.toml"
    nogpu.write_text('[gpu_pod]\ngpus = 0\n[cpu_pod]\n', encoding="utf-8")
    with pytest.raises(pods.PodConfigError, match="gpus must be >= 1"):
        pods.load_pod_config(nogpu)
    missing = tmp_path / "missing.toml"
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "in_process")
    assert pods.load_pod_config(missing) == {}  # off the cluster the tags are simply absent
    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "k8s")
    with pytest.raises(pods.PodConfigError, match="not found"):
        pods.load_pod_config(missing)


def test_assets_carry_owners_and_stage_and_model_tags(monkeypatch):
    from rag_clean_assets.assets.dense import build_dense_asset

    monkeypatch.setenv("RAG_CLEAN_OWNERS", "team:search, ops@example.com")
    spec = load_registry().dense[0]
    asset_spec = build_dense_asset(spec).specs_by_key[next(iter(build_dense_asset(spec).keys))]
    assert list(asset_spec.owners) == ["team:search", "ops@example.com"]
    assert asset_spec.tags["stage"] == "embeddings" and asset_spec.tags["model"] == spec.asset_name
