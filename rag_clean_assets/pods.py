"""Pod requirements of each step on Kubernetes, as `dagster-k8s/config` op tags, from one file.

deploy/pods.toml (or the file named by RAG_CLEAN_POD_CONFIG) has a [gpu_pod] and a [cpu_pod] table;
`gpu_pod_tags()` / `cpu_pod_tags()` turn them into the op tag that dagster-k8s's k8s_job_executor
reads when it builds the step's pod. The tags are set only when the k8s executor is selected
(RAG_CLEAN_EXECUTOR=k8s, read when the code location loads): other executors would ignore them, and a
pod spec in the op tags of a local CPU run only misleads. Imports nothing from dagster_k8s: the project
works without the extra.
"""

from __future__ import annotations

import json
import tomllib
from functools import lru_cache
from pathlib import Path

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.settings import process_setting

POD_CONFIG_ENV = BY_KEY["pod_config"].env
DEFAULT_POD_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "pods.toml"
K8S_CONFIG_TAG = "dagster-k8s/config"  # the key dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY
GPU_RESOURCE = "nvidia.com/gpu"
POD_KINDS = ("gpu_pod", "cpu_pod")
_KEYS = {"gpus", "cpu", "cpu_limit", "memory", "memory_limit", "node_selector", "tolerations"}


class PodConfigError(ValueError):
    """The pod config file is missing (where it is needed) or malformed."""


def pod_config_path() -> Path:
    return Path(process_setting("pod_config") or DEFAULT_POD_CONFIG)


@lru_cache(maxsize=8)
def _load(path: str, required: bool) -> dict:
    file = Path(path)
    if not file.exists():
        if required:
            raise PodConfigError(f"pod config {file} not found: the k8s executor needs it for GPU limits "
                                 f"(set {POD_CONFIG_ENV})")
        return {}
    data = tomllib.loads(file.read_text(encoding="utf-8"))
    for kind in POD_KINDS:
        table = data.get(kind)
        if not isinstance(table, dict):
            raise PodConfigError(f"{file}: missing table [{kind}]")
        unknown = set(table) - _KEYS
        if unknown:
            raise PodConfigError(f"{file} [{kind}]: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    if int(data["gpu_pod"].get("gpus", 0)) < 1:
        raise PodConfigError(f"{file} [gpu_pod]: gpus must be >= 1")
    if data["cpu_pod"].get("gpus"):
        raise PodConfigError(f"{file} [cpu_pod]: CPU steps request no GPU")
    return data


def load_pod_config(path: str | Path | None = None) -> dict:
    """The parsed file; {} when it is absent and the k8s executor is not selected (tags then empty)."""
    required = process_setting("executor") == "k8s"
    return _load(str(path or pod_config_path()), required)


def k8s_config(kind: str, path: str | Path | None = None) -> dict:
    """The `dagster-k8s/config` value for one pod kind (UserDefinedDagsterK8sConfig's dict form)."""
    table = load_pod_config(path).get(kind)
    if table is None:
        return {}
    requests = {k: str(table[src]) for k, src in (("cpu", "cpu"), ("memory", "memory")) if src in table}
    limits = {k: str(table[src]) for k, src in (("cpu", "cpu_limit"), ("memory", "memory_limit")) if src in table}
    if table.get("gpus"):
        # Extended resources are set as limits; Kubernetes makes the request equal to the limit.
        limits[GPU_RESOURCE] = str(int(table["gpus"]))
    pod_spec = {}
    if table.get("node_selector"):
        pod_spec["node_selector"] = dict(table["node_selector"])
    if table.get("tolerations"):
        pod_spec["tolerations"] = [dict(t) for t in table["tolerations"]]
    config = {"container_config": {"resources": {"requests": requests, "limits": limits}}}
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return config


def _tags(kind: str) -> dict[str, str]:
    if process_setting("executor") != "k8s":
        return {}
    config = k8s_config(kind)
    # A JSON string: op tag values must be strings, and dagster_k8s parses this one with json.loads.
    return {K8S_CONFIG_TAG: json.dumps(config, sort_keys=True)} if config else {}


def gpu_pod_tags() -> dict[str, str]:
    return _tags("gpu_pod")


def cpu_pod_tags() -> dict[str, str]:
    return _tags("cpu_pod")
