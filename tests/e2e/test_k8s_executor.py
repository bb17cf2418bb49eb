"""The cluster path end to end: dagster-k8s's own k8s_job_executor, one pod per step.

`dagster asset materialize` with RAG_CLEAN_EXECUTOR=k8s (as users select it) runs the whole graph of the
sample collection with the tiny models; the executor creates one Kubernetes Job per step against the API
stand-in (tests/k8s_standin), which runs each pod as a local process (RAG_CLEAN_K8S_STANDIN_RUNTIME=podman:
as a container of RAG_CLEAN_K8S_STANDIN_IMAGE, built by deploy/build_local_image.sh). The instance is the
one a cluster has: a K8sRunLauncher in dagster.yaml giving pods their env, DAGSTER_HOME and the shared
folders. Checked: every asset file byte-identical to an in-process run; one pod per step; GPU steps'
pods carry the nvidia.com/gpu limit and the rest of deploy/pods.toml's [gpu_pod]; a step killed at its
memory limit fails the run with the executor's message, leaves the previous file, and a rerun succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from project_env import REPO_ROOT, init_instance, project_env

dagster_k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s is installed by scripts/bootstrap.sh")
kubernetes = pytest.importorskip("kubernetes")

from k8s_standin import ApiServer, Cluster, PodmanRuntime, ProcessRuntime, runtime_name  # noqa: E402
from k8s_standin.instance import NAMESPACE, run_launcher_config, write_cluster_instance  # noqa: E402

from rag_clean.config.registry import load_registry  # noqa: E402
from rag_clean_assets import pods  # noqa: E402

pytestmark = pytest.mark.e2e

COLLECTION = "sample"
SAMPLE = REPO_ROOT / "data" / "collections" / COLLECTION
DAGSTER = str(Path(sys.executable).parent / "dagster")
IMAGE = os.environ.get("RAG_CLEAN_K8S_STANDIN_IMAGE", "localhost/rag-clean:local")
# Two step pods at a time: this machine has 2 cores, and each pod imports torch.
RUN_CONFIG = json.dumps({"execution": {"config": {"max_concurrent": 2}}})
# Not asset values (rag_clean/storage/layout.py): timings, remembered state, and "_" side folders such as
# chunks/_files (its metadata holds the chunks file's mtime, different in any two runs).
NOT_ASSET_ROOTS = ("telemetry", "state")
DENSE_A = ("dense_embeddings", "tiny_a", f"{COLLECTION}.arrow")


def _materialize(env: dict, cwd: Path, select: str = "*", executor_config: bool = True) -> subprocess.CompletedProcess:
    args = [DAGSTER, "asset", "materialize", "--select", select, "--partition", COLLECTION,
            "-m", "rag_clean_assets.definitions", *(["--config-json", RUN_CONFIG] if executor_config else [])]
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _asset_files(storage: Path) -> dict[str, str]:
    """Every asset file under the storage root -> sha256."""
    files = {}
    for path in sorted(storage.rglob("*")):
        parts = path.relative_to(storage).parts
        if path.is_file() and parts[0] not in NOT_ASSET_ROOTS and not any(p.startswith("_") for p in parts):
            files["/".join(parts)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _runtime(tmp: Path):
    if runtime_name() == "podman":
        return PodmanRuntime()
    # The "image" of a process pod: this Python environment and this checkout, nothing of the test's env.
    image_env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
                 "PYTHONPATH": str(REPO_ROOT), "HOME": os.environ.get("HOME", str(tmp))}
    return ProcessRuntime(image_env, workdir=tmp)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_registry_path):
    base = tmp_path_factory.getbasetemp()  # holds the tiny models too: the pods' shared folder
    tmp = tmp_path_factory.mktemp("k8s")
    data = tmp / "data"
    shutil.copytree(SAMPLE, data / COLLECTION)
    shared = {"RAG_CLEAN_QUERY_KEY_FILE": str(tmp / "query_key")}  # both runs hash queries with one key

    # One storage root path for both runs (vector_index records its sink's absolute location): the
    # in-process run's files are moved aside before the cluster run starts from an empty root.
    storage = tmp / "storage"
    in_process = project_env(tmp / "in_process", tiny_registry_path, data, RAG_CLEAN_EXECUTOR="in_process", **shared)
    in_process["RAG_CLEAN_STORAGE_ROOT"] = str(storage)
    init_instance(in_process, tmp, [COLLECTION])
    start = time.monotonic()
    _ok(_materialize(in_process, tmp, executor_config=False))
    in_process_s = time.monotonic() - start
    storage.rename(tmp / "storage-in-process")

    env = project_env(tmp / "cluster", tiny_registry_path, data, RAG_CLEAN_EXECUTOR="k8s", **shared)
    env["RAG_CLEAN_STORAGE_ROOT"] = str(storage)
    init_instance(env, tmp, [COLLECTION])
    home = Path(env["DAGSTER_HOME"])
    podman = runtime_name() == "podman"
    with ApiServer(Cluster(_runtime(tmp), tmp / "standin")) as server:
        kubeconfig = server.write_kubeconfig(home / "kubeconfig", NAMESPACE)
        # Podman pods run as root here: pytest's temporary folders belong to root (the demo script runs
        # them as the image's user 1000 on folders it owns).
        write_cluster_instance(home, run_launcher_config(
            kubeconfig=kubeconfig, image=IMAGE, dagster_home=str(home), env=env,
            mounts=[("shared", base, str(base))], security_context={"run_as_user": 0} if podman else None))
        start = time.monotonic()
        run = _materialize(env, tmp)
        cluster_s = time.monotonic() - start
        _ok(run)
        print(f"\nin-process run {in_process_s:.1f} s; k8s_job_executor run ({runtime_name()} pods) {cluster_s:.1f} s")
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core = kubernetes.client.CoreV1Api(api)
        _wait_for_pods_to_end(core)
        yield {"tmp": tmp, "env": env, "in_process_storage": tmp / "storage-in-process", "server": server, "run": run,
               "core": core, "batch": kubernetes.client.BatchV1Api(api)}


def _wait_for_pods_to_end(core, timeout: float = 120) -> None:
    """A run ends when its steps' events say so; a pod (a container above all) may still be exiting."""
    deadline = time.monotonic() + timeout
    while any(p.status.phase not in ("Succeeded", "Failed") for p in core.list_namespaced_pod(NAMESPACE).items):
        assert time.monotonic() < deadline, "step pods still running after the run ended"
        time.sleep(0.5)


def _step_pods(core, since: set[str] = frozenset()) -> dict[str, object]:
    """Step key -> pod, for the pods not in `since` (names)."""
    found = {}
    for pod in core.list_namespaced_pod(NAMESPACE).items:
        if pod.metadata.name in since:
            continue
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env["DAGSTER_RUN_STEP_KEY"] not in found, f"two pods for step {env['DAGSTER_RUN_STEP_KEY']}"
        found[env["DAGSTER_RUN_STEP_KEY"]] = pod
    return found


def _plan_step_keys(monkeypatch, registry_path) -> set[str]:
    from dagster._core.execution.api import create_execution_plan

    from rag_clean_assets.definitions import EMBED_JOB_NAME, build_definitions

    monkeypatch.setenv("RAG_CLEAN_EXECUTOR", "k8s")
    job = build_definitions(str(registry_path)).resolve_job_def(EMBED_JOB_NAME)
    return {step.key for step in create_execution_plan(job).steps}


def test_every_asset_file_is_identical_to_the_in_process_run(cluster):
    ours = _asset_files(Path(cluster["env"]["RAG_CLEAN_STORAGE_ROOT"]))
    theirs = _asset_files(cluster["in_process_storage"])
    assert "/".join(DENSE_A) in ours and f"reranked/{COLLECTION}.parquet" in ours, sorted(ours)
    assert ours == theirs


def test_one_pod_per_step_and_gpu_steps_carry_the_pod_config(cluster, monkeypatch, tiny_registry_path):
    steps = _step_pods(cluster["core"])
    # exports is off by default: it yields nothing, so its check's step is skipped and never gets a pod.
    assert set(steps) == _plan_step_keys(monkeypatch, tiny_registry_path) - {"exports_exports_valid"}
    registry = load_registry(str(tiny_registry_path))
    gpu_steps = {f"dense_embeddings__{s.asset_name}" for s in registry.dense} | {"sparse_vectors", "reranked"}
    config = pods.load_pod_config(pods.DEFAULT_POD_CONFIG)
    gpu, cpu = config["gpu_pod"], config["cpu_pod"]
    for key, pod in steps.items():
        job = cluster["batch"].read_namespaced_job_status(pod.metadata.labels["job-name"], NAMESPACE)
        assert job.status.succeeded == 1 and not job.status.failed, key
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0, key
        (container,) = pod.spec.containers
        assert container.image == IMAGE and container.args[:3] == ["dagster", "api", "execute_step"], key
        env = {e.name: e.value for e in container.env}
        assert env["RAG_CLEAN_EXECUTOR"] == "k8s" and env["DAGSTER_HOME"] == cluster["env"]["DAGSTER_HOME"], key
        limits, requests = container.resources.limits or {}, container.resources.requests or {}
        if key in gpu_steps:
            assert limits[pods.GPU_RESOURCE] == str(gpu["gpus"]), key
            assert (limits["memory"], requests["memory"]) == (gpu["memory_limit"], gpu["memory"]), key
            assert (limits["cpu"], requests["cpu"]) == (gpu["cpu_limit"], gpu["cpu"]), key
            assert pod.spec.node_selector == gpu["node_selector"], key
            assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == \
                [(t["key"], t["operator"], t["effect"]) for t in gpu["tolerations"]], key
        else:
            assert pods.GPU_RESOURCE not in limits and not pod.spec.node_selector, key
            if key in ("chunks", "fused_embeddings", "queries", "exports"):
                assert (limits["memory"], requests["memory"]) == (cpu["memory_limit"], cpu["memory"]), key


def test_a_step_over_its_memory_limit_fails_the_run_and_a_rerun_succeeds(cluster):
    tmp, env, core = cluster["tmp"], cluster["env"], cluster["core"]
    storage = Path(env["RAG_CLEAN_STORAGE_ROOT"])
    dense_file = storage.joinpath(*DENSE_A)
    before = (dense_file.read_bytes(), sorted(p.name for p in dense_file.parent.iterdir()))
    # The same pod config with a GPU pod of 64 MiB: the step's process is killed while it starts.
    gpu_part, cpu_part = pods.DEFAULT_POD_CONFIG.read_text(encoding="utf-8").split("[cpu_pod]")
    small, count = re.subn(r'^(memory(?:_limit)?) = ".*"$', r'\1 = "64Mi"', gpu_part, flags=re.M)
    assert count == 2
    small_config = tmp / "pods-64Mi.toml"
    small_config.write_text(small + "[cpu_pod]" + cpu_part, encoding="utf-8")
    earlier = {p.metadata.name for p in core.list_namespaced_pod(NAMESPACE).items}

    failed = _materialize({**env, pods.POD_CONFIG_ENV: str(small_config)}, tmp, select="/".join(DENSE_A[:2]))

    assert failed.returncode != 0
    _wait_for_pods_to_end(core)
    (pod,) = [p for k, p in _step_pods(core, earlier).items() if k == "dense_embeddings__tiny_a"]
    assert pod.spec.containers[0].resources.limits["memory"] == "64Mi"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")
    job_name = pod.metadata.labels["job-name"]
    output = failed.stdout + failed.stderr
    assert f"Discovered failed Kubernetes job {job_name} for step dense_embeddings__tiny_a" in output, output[-4000:]
    assert (dense_file.read_bytes(), sorted(p.name for p in dense_file.parent.iterdir())) == before

    rerun_from = {p.metadata.name for p in core.list_namespaced_pod(NAMESPACE).items}
    _ok(_materialize(env, tmp, select="/".join(DENSE_A[:2])))
    _wait_for_pods_to_end(core)
    rerun = _step_pods(core, rerun_from)["dense_embeddings__tiny_a"]
    assert rerun.status.container_statuses[0].state.terminated.exit_code == 0
    assert dense_file.read_bytes() == before[0]
