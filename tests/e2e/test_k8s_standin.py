"""The Kubernetes API stand-in itself (tests/k8s_standin), driven by the official kubernetes client with
tiny Python pods: Job status follows the pod's exit, backoffLimit retries, the memory limit kills at
137 / OOMKilled, volumes and env reach the pod, and what it does not model fails loudly."""

from __future__ import annotations

import sys
import time

import pytest

kubernetes = pytest.importorskip("kubernetes")
pytest.importorskip("psutil")

from k8s_standin import ApiServer, Cluster, ProcessRuntime  # noqa: E402
from k8s_standin.kubelet import PodSpecError, memory_bytes  # noqa: E402

NS = "standin"


@pytest.fixture
def api(tmp_path):
    runtime = ProcessRuntime({"PATH": "/usr/bin:/bin"}, workdir=tmp_path, rss_poll_s=0.05)
    with ApiServer(Cluster(runtime, tmp_path / "standin")) as server:
        client = kubernetes.config.new_client_from_config(config_file=str(server.write_kubeconfig(tmp_path / "kc", NS)))
        yield kubernetes.client.BatchV1Api(client), kubernetes.client.CoreV1Api(client), tmp_path


def _job(name: str, code: str, *, env=None, volumes=(), memory=None, backoff=0) -> dict:
    container = {"name": "main", "image": "python-here", "args": [sys.executable, "-c", code],
                 "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                 "volumeMounts": [{"name": f"v{i}", "mountPath": path} for i, (_, path) in enumerate(volumes)]}
    if memory:
        container["resources"] = {"limits": {"memory": memory}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff, "template": {"metadata": {"labels": {"app": name}}, "spec": {
                "restartPolicy": "Never", "containers": [container],
                "volumes": [{"name": f"v{i}", "hostPath": {"path": str(host)}} for i, (host, _) in enumerate(volumes)]}}}}


def _finished(batch, name: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = batch.read_namespaced_job_status(name, NS).status
        if status.succeeded or (status.failed and not status.active):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {name} did not finish")


def test_job_status_env_volumes_and_logs(api):
    batch, core, tmp = api
    shared = tmp / "shared"
    shared.mkdir()
    code = f"import os; open({str(shared / 'out.txt')!r}, 'w').write(os.environ['GREETING']); print('hello from the pod')"
    batch.create_namespaced_job(NS, _job("ok", code, env={"GREETING": "hi"}, volumes=[(shared, str(shared))]))
    status = _finished(batch, "ok")
    assert status.succeeded == 1 and status.conditions[0].type == "Complete"
    assert (shared / "out.txt").read_text() == "hi"
    (pod,) = core.list_namespaced_pod(NS, label_selector="job-name=ok").items
    assert pod.metadata.labels["app"] == "ok" and pod.status.phase == "Succeeded"
    assert "hello from the pod" in core.read_namespaced_pod_log(pod.metadata.name, NS)
    assert batch.list_namespaced_job(NS, field_selector="metadata.name=ok").items[0].metadata.name == "ok"
    assert batch.list_namespaced_job(NS, field_selector="metadata.name=other").items == []
    reasons = [e.reason for e in core.list_namespaced_event(NS, field_selector=f"involvedObject.name={pod.metadata.name}").items]
    assert "Started" in reasons


def test_exit_code_fails_the_job_after_its_retries(api):
    batch, core, _ = api
    batch.create_namespaced_job(NS, _job("bad", "raise SystemExit(3)", backoff=1))
    status = _finished(batch, "bad")
    assert status.failed == 2 and not status.succeeded  # the first pod + one retry
    pods = core.list_namespaced_pod(NS, label_selector="job-name=bad").items
    assert sorted(p.status.container_statuses[0].state.terminated.exit_code for p in pods) == [3, 3]


def test_memory_limit_kills_with_137(api):
    batch, core, _ = api
    batch.create_namespaced_job(NS, _job("hog", "import time; x = bytearray(400 * 2**20); time.sleep(30)", memory="100Mi"))
    status = _finished(batch, "hog")
    assert status.failed == 1
    (pod,) = core.list_namespaced_pod(NS, label_selector="job-name=hog").items
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")


def test_delete_kills_the_pod_and_unknown_calls_fail_loudly(api):
    batch, core, _ = api
    batch.create_namespaced_job(NS, _job("sleepy", "import time; time.sleep(60)"))
    (pod,) = core.list_namespaced_pod(NS, label_selector="job-name=sleepy").items
    batch.delete_namespaced_job("sleepy", NS)
    core.delete_namespaced_pod(pod.metadata.name, NS)
    assert core.list_namespaced_pod(NS, label_selector="job-name=sleepy").items == []
    with pytest.raises(kubernetes.client.rest.ApiException) as err:
        batch.read_namespaced_job_status("sleepy", NS)
    assert err.value.status == 404
    with pytest.raises(kubernetes.client.rest.ApiException) as err:
        core.list_namespaced_config_map(NS)
    assert err.value.status == 404 and "not modelled by the Kubernetes API stand-in" in err.value.body


def test_a_volume_a_process_cannot_honour_fails_the_pod_with_the_reason(api, tmp_path):
    batch, core, _ = api
    batch.create_namespaced_job(NS, _job("moved", "pass", volumes=[(tmp_path, "/mnt/elsewhere")]))
    assert _finished(batch, "moved").failed == 1
    (pod,) = core.list_namespaced_pod(NS, label_selector="job-name=moved").items
    assert "must be mounted at its host path" in core.read_namespaced_pod_log(pod.metadata.name, NS)
    assert memory_bytes("64Mi") == 64 * 2**20 and memory_bytes("1G") == 10**9
    with pytest.raises(PodSpecError, match="memory quantity"):
        memory_bytes("lots")
