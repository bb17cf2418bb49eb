"""deploy/: the user-code Dockerfile (parsed and linted) and the Helm values (parsed, checked against
what the code location needs)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
VALUES = REPO / "deploy" / "helm" / "values.yaml"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def _args(instructions, name):
    return [rest for word, rest in instructions if word == name]


def _dockerfile():
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_dockerfile_instructions_are_known_and_base_is_cuda():
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
    instructions = _dockerfile()
    assert {w for w, _ in instructions} <= known
    assert instructions[0][0] in {"ARG", "FROM"}
    args = dict(a.split("=", 1) for a in _args(instructions, "ARG") if "=" in a)
    (base,) = _args(instructions, "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("nvidia/cuda:") or base.startswith("pytorch/pytorch:"), base
    assert ":" in base and not base.endswith(":latest"), "the base image is pinned to a tag"


def test_dockerfile_runs_as_non_root_with_a_passthrough_entrypoint():
    instructions = _dockerfile()
    users = _args(instructions, "USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0].isdigit(), "numeric, so runAsNonRoot can check it"
    # Nothing is installed after the switch (it would fail, or need root again).
    last_user = max(i for i, (w, _) in enumerate(instructions) if w == "USER")
    assert all(w not in {"RUN"} for w, _ in instructions[last_user:])
    (entrypoint,) = _args(instructions, "ENTRYPOINT")
    (cmd,) = _args(instructions, "CMD")
    # Run and step pods set only `args` (dagster api execute_run/execute_step): the entrypoint must pass them on.
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--"]
    assert json.loads(cmd)[:3] == ["dagster", "api", "grpc"] and "rag_clean_assets.definitions" in json.loads(cmd)


def test_dockerfile_installs_pinned_versions():
    instructions = _dockerfile()
    runs = " ".join(_args(instructions, "RUN"))
    constraints = REPO / "deploy" / "constraints.txt"
    pins = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned exactly: {line}"
            pins[name.lower()] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["k8s"]:
        name = re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower()
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
    assert pins["dagster"] == next(d.split("==")[1] for d in project["dependencies"] if d.startswith("dagster=="))
    installs = [shlex.split(cmd) for run in _args(instructions, "RUN") for cmd in run.split("&&")]
    pip = [c for c in installs if c[:2] == ["pip", "install"]]
    assert pip
    for c in pip:
        packages = [a for a in c[2:] if not a.startswith("-") and a != "deploy/constraints.txt"]
        if "--no-deps" in c:
            assert all("==" in a for a in packages), f"--no-deps installs name exact versions: {c}"
            continue
        assert "-c" in c, f"not constrained: {c}"
        for arg in packages:
            assert arg.startswith(".[") or arg.lower() in pins, f"{arg} is not pinned in deploy/constraints.txt"
    assert "dagster-k8s==0.29.27" in runs and "dagster-postgres==0.29.27" in runs


def test_every_copied_file_exists():
    for rest in _args(_dockerfile(), "COPY"):
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert not source.startswith("--"), "no COPY --from stages expected"
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    copied = {shlex.split(r)[0] for r in _args(_dockerfile(), "COPY")}
    # What the package install needs (setuptools packages.find includes these three).
    assert {"pyproject.toml", "rag_clean", "resources", "rag_clean_assets", "deploy/pods.toml"} <= copied


def test_helm_values_name_the_image_the_executor_and_the_gpu_pool():
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["image"]["repository"] and deployment["image"]["tag"] not in ("", "latest")
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "rag_clean_assets.definitions"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["RAG_CLEAN_EXECUTOR"] == "k8s"
    mounts = {m["name"]: m["mountPath"] for m in deployment["volumeMounts"]}
    assert any(env["RAG_CLEAN_STORAGE_ROOT"].startswith(p + "/") for p in mounts.values()), "storage on the shared volume"
    assert not any(env["RAG_CLEAN_GPU_LOCK_DIR"].startswith(p + "/") for p in mounts.values()), "GPU locks stay pod-local"
    assert deployment["podSecurityContext"]["runAsNonRoot"] is True
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is True
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    pools = values["concurrency"]["pools"]
    assert values["concurrency"]["enabled"] is True
    assert isinstance(pools["defaultLimit"], int) and pools["defaultLimit"] >= 1
    assert pools["granularity"] == "op"  # slots per GPU step, not per run
