"""A stand-in for the Kubernetes API server, for tests of the cluster path (not part of the product).

No Kubernetes control plane installs on the machines this project is tested on (docs/scaling.md,
"Checked without a cluster"). This package answers the few API calls dagster-k8s makes (api.py) and
runs each Job's pod as a local process or a podman container (kubelet.py), so dagster-k8s's own,
unmodified k8s_job_executor and K8sRunLauncher can be driven end to end. instance.py writes the
dagster.yaml that points Dagster at it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .api import ApiServer, Cluster
from .kubelet import PodmanRuntime, ProcessRuntime

RUNTIME_ENV = "RAG_CLEAN_K8S_STANDIN_RUNTIME"  # "process" (default) or "podman"

__all__ = ["ApiServer", "Cluster", "PodmanRuntime", "ProcessRuntime", "RUNTIME_ENV", "runtime_name"]


def runtime_name() -> str:
    name = os.environ.get(RUNTIME_ENV, "process") or "process"
    if name not in ("process", "podman"):
        raise ValueError(f"{RUNTIME_ENV}={name!r}: expected process or podman")
    return name
