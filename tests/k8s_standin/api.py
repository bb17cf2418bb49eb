"""A stand-in for the Kubernetes API server: only the calls dagster-k8s's client makes, over HTTP.

Routes (what `DagsterKubernetesClient`, `K8sStepHandler` and `K8sRunLauncher` call, read from
dagster_k8s 0.29.27):

  POST   /apis/batch/v1/namespaces/{ns}/jobs                 create_namespaced_job
  GET    /apis/batch/v1/namespaces/{ns}/jobs                 list_namespaced_job (fieldSelector metadata.name=, labelSelector)
  GET    /apis/batch/v1/namespaces/{ns}/jobs/{name}[/status] read_namespaced_job[_status]
  DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}          delete_namespaced_job (pods are orphaned, as by default)
  GET    /api/v1/namespaces/{ns}/pods                        list_namespaced_pod (labelSelector job-name=, fieldSelector)
  GET    /api/v1/namespaces/{ns}/pods/{name}                 read_namespaced_pod
  GET    /api/v1/namespaces/{ns}/pods/{name}/log             read_namespaced_pod_log
  DELETE /api/v1/namespaces/{ns}/pods/{name}                 delete_namespaced_pod (kills it)
  GET    /api/v1/namespaces/{ns}/events                      list_namespaced_event (fieldSelector involvedObject.name=)

Anything else answers 404 naming the call, so a dagster-k8s that starts using another call fails loudly.
A Job starts its pod at once (no scheduler, no nodes, no quotas, no image pulls) through the kubelet
stand-in (kubelet.py); the Job's status follows the pod's exit as the Job controller would, including
`backoffLimit` retries. Binds 127.0.0.1 only; no authentication (the kubeconfig has none).
"""

from __future__ import annotations

import copy
import json
import secrets
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qs, urlparse

from .kubelet import PodSpecError, pod_launch

_JOBS = ("apis", "batch", "v1", "namespaces")
_CORE = ("api", "v1", "namespaces")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(obj: dict, field_selector: str | None, label_selector: str | None) -> bool:
    """The equality selectors dagster-k8s uses (k=v, comma-separated)."""
    for selector, lookup in ((field_selector, _field), (label_selector, lambda o, k: o["metadata"].get("labels", {}).get(k))):
        for term in filter(None, (selector or "").split(",")):
            key, _, value = term.partition("=")
            if lookup(obj, key) != value:
                return False
    return True


def _field(obj: dict, path: str):
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


class Cluster:
    """The objects (Jobs, Pods, Events) of the stand-in and what happens to them."""

    def __init__(self, runtime, workdir: Path, claims: Mapping[str, Path] | None = None):
        self.runtime, self.claims = runtime, dict(claims or {})
        self.logs = Path(workdir) / "pod-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.events: list[dict] = []
        self._running: dict[tuple[str, str], object] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ events
    def _event(self, ns: str, kind: str, name: str, reason: str, message: str, type_: str = "Normal") -> None:
        self.events.append({"apiVersion": "v1", "kind": "Event", "type": type_, "reason": reason, "message": message,
                            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:12]}", "namespace": ns},
                            "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                            "firstTimestamp": _now(), "lastTimestamp": _now(), "count": 1})

    # ------------------------------------------------------------------ jobs
    def create_job(self, ns: str, body: dict) -> dict:
        name = body["metadata"]["name"]
        with self._lock:
            if (ns, name) in self.jobs:
                raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            job = copy.deepcopy(body)
            job["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
            job["status"] = {"startTime": _now(), "active": 1}
            self.jobs[(ns, name)] = job
        self._start_pod(ns, job)
        return job

    def _start_pod(self, ns: str, job: dict) -> None:
        template = job["spec"]["template"]
        job_name = job["metadata"]["name"]
        name = f"{job_name}-{secrets.token_hex(3)[:5]}"  # like the Job controller's generated suffix
        labels = {**(template.get("metadata", {}).get("labels") or {}), "job-name": job_name,
                  "batch.kubernetes.io/job-name": job_name, "controller-uid": job["metadata"]["uid"]}
        pod = {"apiVersion": "v1", "kind": "Pod", "spec": copy.deepcopy(template["spec"]),
               "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "labels": labels,
                            "creationTimestamp": _now(), "annotations": template.get("metadata", {}).get("annotations") or {}},
               "status": {"phase": "Pending"}}
        with self._lock:
            self.pods[(ns, name)] = pod
        self._event(ns, "Job", job_name, "SuccessfulCreate", f"Created pod: {name}")
        container = pod["spec"]["containers"][0]["name"] if pod["spec"].get("containers") else "dagster"
        try:
            launch = pod_launch(pod, self.claims)
            running = self.runtime.start(launch, self.logs / f"{ns}_{name}.log")
        except PodSpecError as exc:
            (self.logs / f"{ns}_{name}.log").write_text(f"stand-in: {exc}\n", encoding="utf-8")
            self._event(ns, "Pod", name, "Failed", str(exc), "Warning")
            self._pod_exited(ns, job_name, name, container, 128, "StartError", str(exc))
            return
        with self._lock:
            self._running[(ns, name)] = running
            pod["status"] = {"phase": "Running", "startTime": _now(), "containerStatuses": [
                {"name": container, "ready": True, "restartCount": 0, "image": launch.image,
                 "imageID": launch.image, "started": True, "state": {"running": {"startedAt": _now()}}}]}
        self._event(ns, "Pod", name, "Started", f"Started container {container} ({self.runtime.name})")
        threading.Thread(target=self._wait, args=(ns, job_name, name, container, running), daemon=True).start()

    def _wait(self, ns, job_name, name, container, running) -> None:
        end = running.wait()
        self._pod_exited(ns, job_name, name, container, end.code, end.reason, end.message)

    def _pod_exited(self, ns, job_name, name, container, code, reason, message) -> None:
        with self._lock:
            self._running.pop((ns, name), None)
            pod = self.pods.get((ns, name))
            if pod is not None:
                terminated = {"exitCode": code, "reason": reason, "finishedAt": _now(), **({"message": message} if message else {})}
                image = pod["spec"]["containers"][0].get("image", "") if pod["spec"].get("containers") else ""
                pod["status"] = {**pod["status"], "phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
                    {"name": container, "ready": False, "restartCount": 0, "image": image, "imageID": image,
                     "state": {"terminated": terminated}}]}
            job = self.jobs.get((ns, job_name))
            if job is None:  # deleted meanwhile
                return
            status = job["status"]
            status.pop("active", None)
            if code == 0:
                status.update(succeeded=1, completionTime=_now(),
                              conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": _now()}])
                retry = False
            else:
                status["failed"] = status.get("failed", 0) + 1
                retry = status["failed"] <= int(job["spec"].get("backoffLimit", 6))
                if retry:
                    status["active"] = 1
                else:
                    status["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                             "message": "Job has reached the specified backoff limit",
                                             "lastTransitionTime": _now()}]
        if code != 0:
            self._event(ns, "Pod", name, reason, message or f"exit code {code}", "Warning")
        if retry:
            self._start_pod(ns, job)
        elif code != 0:
            self._event(ns, "Job", job_name, "BackoffLimitExceeded", "Job has reached the specified backoff limit", "Warning")

    def delete_job(self, ns: str, name: str) -> dict:
        with self._lock:
            if self.jobs.pop((ns, name), None) is None:
                raise ApiError(404, "NotFound", f'jobs.batch "{name}" not found')
        return {"apiVersion": "v1", "kind": "Status", "status": "Success", "details": {"name": name, "kind": "jobs"}}

    def delete_pod(self, ns: str, name: str) -> dict:
        with self._lock:
            pod = self.pods.pop((ns, name), None)
            running = self._running.pop((ns, name), None)
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        if running is not None:
            running.kill()
        return pod

    def stop(self) -> None:
        """Kill every pod still running (the test's teardown)."""
        with self._lock:
            running = list(self._running.values())
        for pod in running:
            pod.kill()

    def get(self, table: dict, ns: str, name: str, what: str) -> dict:
        with self._lock:
            obj = table.get((ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{what} "{name}" not found')
            return copy.deepcopy(obj)

    def listing(self, kind: str, items, ns: str, query: dict) -> dict:
        field_selector = query.get("fieldSelector", [None])[0]
        label_selector = query.get("labelSelector", [None])[0]
        with self._lock:
            chosen = [copy.deepcopy(o) for o in items if o["metadata"].get("namespace") == ns
                      and _matches(o, field_selector, label_selector)]
        api = "batch/v1" if kind == "JobList" else "v1"
        return {"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": chosen}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict:
        return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": self.message,
                "reason": self.reason, "code": self.code}


def _route(cluster: Cluster, method: str, parts: list[str], query: dict, body: dict | None):
    """(status, payload) for one request; payload is a dict (JSON) or str (text/plain)."""
    if tuple(parts[:4]) == _JOBS and len(parts) >= 6 and parts[5] == "jobs":
        ns, rest = parts[4], parts[6:]
        if method == "POST" and not rest:
            return 201, cluster.create_job(ns, body or {})
        if method == "GET" and not rest:
            return 200, cluster.listing("JobList", list(cluster.jobs.values()), ns, query)
        if method == "GET" and rest in ([rest[0]], [rest[0], "status"]):
            return 200, cluster.get(cluster.jobs, ns, rest[0], "jobs.batch")
        if method == "DELETE" and len(rest) == 1:
            return 200, cluster.delete_job(ns, rest[0])
    if tuple(parts[:3]) == _CORE and len(parts) >= 5:
        ns, kind, rest = parts[3], parts[4], parts[5:]
        if kind == "pods":
            if method == "GET" and not rest:
                return 200, cluster.listing("PodList", list(cluster.pods.values()), ns, query)
            if method == "GET" and len(rest) == 1:
                return 200, cluster.get(cluster.pods, ns, rest[0], "pods")
            if method == "GET" and len(rest) == 2 and rest[1] == "log":
                cluster.get(cluster.pods, ns, rest[0], "pods")
                log = cluster.logs / f"{ns}_{rest[0]}.log"
                return 200, log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
            if method == "DELETE" and len(rest) == 1:
                return 200, cluster.delete_pod(ns, rest[0])
        if kind == "events" and method == "GET" and not rest:
            return 200, cluster.listing("EventList", list(cluster.events), ns, query)
    raise ApiError(404, "NotFound", f"{method} /{'/'.join(parts)}: not modelled by the Kubernetes API stand-in")


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster  # set on the subclass made per server

    def _handle(self) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        try:
            status, payload = _route(self.cluster, self.command, [p for p in url.path.split("/") if p],
                                     parse_qs(url.query), body)
        except ApiError as err:
            status, payload = err.code, err.body()
        except PodSpecError as err:
            status, payload = 422, ApiError(422, "Invalid", str(err)).body()
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, format, *args):  # noqa: A002 - quiet: pytest captures stderr anyway
        pass


class ApiServer:
    """The HTTP side: `with ApiServer(cluster) as server: server.url`."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        handler = type("Handler", (_Handler,), {"cluster": cluster})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "ApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.stop()
        self._httpd.shutdown()
        self._httpd.server_close()

    def write_kubeconfig(self, path: Path, namespace: str) -> Path:
        """A kubeconfig whose current context talks to this server (JSON is valid YAML)."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "standin",
                  "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                  "users": [{"name": "standin", "user": {}}],
                  "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                              "namespace": namespace}}]}
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path
