"""The Dagster instance of a "cluster" run against the stand-in: dagster.yaml with a K8sRunLauncher.

On a real cluster the Helm chart writes this section (deploy/helm/values.yaml): k8s_job_executor reads
the run launcher for the namespace, image, DAGSTER_HOME, env and volumes of every step pod. Here the
launcher points at the stand-in's kubeconfig instead of the in-cluster config; the env is the user
deployment's (the project's RAG_CLEAN_* / EMBEDDER_* / HF_* settings) and the volumes are host folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

from rag_clean_assets.instance import CONFIG_MARKER

NAMESPACE = "rag-clean"
# What a pod gets from the deployment (Helm `env`): the project's settings, the offline hub, the instance.
FORWARDED_PREFIXES = ("RAG_CLEAN_", "EMBEDDER_", "HF_", "TRANSFORMERS_")


def pod_env(env: Mapping[str, str]) -> list[str]:
    """K8sRunLauncher `env_vars` ("NAME=value") for the project's settings in `env`."""
    return [f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(FORWARDED_PREFIXES)]


def run_launcher_config(*, kubeconfig: Path, image: str, dagster_home: str, env: Mapping[str, str],
                        mounts: Iterable[tuple[str, Path, str]], namespace: str = NAMESPACE,
                        security_context: Mapping | None = None) -> dict:
    """mounts: (volume name, host folder, mount path); each a hostPath volume."""
    mounts = list(mounts)
    config = {
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig),
        "job_namespace": namespace,
        "job_image": image,
        "image_pull_policy": "Never",
        "service_account_name": "default",
        "instance_config_map": "dagster-instance",  # required by the launcher; pods get DAGSTER_HOME via the volume
        "dagster_home": dagster_home,
        "env_vars": pod_env(env),
        "volumes": [{"name": name, "host_path": {"path": str(host), "type": "Directory"}} for name, host, _ in mounts],
        "volume_mounts": [{"name": name, "mount_path": path} for name, _, path in mounts],
    }
    if security_context:
        config["run_k8s_config"] = {"pod_spec_config": {"security_context": dict(security_context)}}
    return config


def write_cluster_instance(home: Path, launcher: dict) -> Path:
    """Add the K8sRunLauncher to the dagster.yaml `collections init-home` wrote, taking the file over
    (its marker line removed, so init-home leaves it alone from now on, as documented for user edits)."""
    config = home / "dagster.yaml"
    lines = [line for line in config.read_text(encoding="utf-8").splitlines() if not line.startswith(CONFIG_MARKER)]
    # JSON is YAML: no quoting rules to get wrong for paths and env values.
    lines += ["run_launcher:", "  module: dagster_k8s.launcher", "  class: K8sRunLauncher",
              f"  config: {json.dumps(launcher)}"]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config
