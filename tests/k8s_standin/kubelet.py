"""The stand-in's "kubelet": one pod spec -> one local process or podman container, and its exit.

`pod_launch()` reads what a pod asks for (image, command/args, env, volumes, resources, user) and refuses,
with one clear line, what this stand-in cannot honour. Two runtimes start it:

- `ProcessRuntime` (CI): the pod's args run as a process of this machine, whose Python environment plays
  the image (its env is the node's `image_env` plus the pod's env). A process sees the host's files, so
  a volume is honoured only where it is mounted at its own host path; the memory limit is enforced by
  sampling the pod's process tree's RSS (SIGKILL above it, exit 137, reason OOMKilled, as the cgroup
  OOM killer would).
- `PodmanRuntime` (opt-in): `podman run` of the pod's image with its env, volumes (bind mounts),
  `--memory` / `--cpus` from the limits, the user of its securityContext; exit code from podman, and
  OOMKilled from podman or, where podman misses it (4.3 + runc on cgroup v1), the kernel's OOM log.

Neither models image pulls, node selectors, tolerations or GPU devices: an `nvidia.com/gpu` limit is
read and reported, never granted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

GPU_RESOURCE = "nvidia.com/gpu"
PODMAN = ("podman", "--runtime", "runc")  # crun fails on hybrid cgroups (shared/ENVIRONMENT.md)
PODMAN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class PodSpecError(ValueError):
    """The pod asks for something this stand-in does not model; the pod fails with this message."""


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "8Gi", "1G", "1048576") in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?|)", str(quantity).strip())
    if not match:
        raise PodSpecError(f"memory quantity {quantity!r}: expected a number with an optional unit (Mi, Gi, M, G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def cpu_cores(quantity: str) -> float:
    text = str(quantity).strip()
    if re.fullmatch(r"\d+m", text):
        return int(text[:-1]) / 1000
    try:
        return float(text)
    except ValueError:
        raise PodSpecError(f"cpu quantity {quantity!r}: expected cores (\"2\", \"0.5\") or millicores (\"500m\")") from None


@dataclass(frozen=True)
class Mount:
    host: Path
    path: str
    read_only: bool = False


@dataclass(frozen=True)
class PodLaunch:
    """What one pod's single container asks for, resolved against the stand-in's volumes."""

    name: str
    image: str
    command: list[str] | None  # None: the image's entrypoint
    args: list[str]
    env: dict[str, str]
    mounts: list[Mount] = field(default_factory=list)
    working_dir: str | None = None
    memory_limit: int | None = None
    cpu_limit: float | None = None
    gpus: int = 0
    user: tuple[int, int | None] | None = None


def _env(container: dict) -> dict[str, str]:
    if container.get("envFrom"):
        raise PodSpecError("envFrom (ConfigMap/Secret env sources) is not modelled: pass env values directly")
    env = {}
    for item in container.get("env") or []:
        if "valueFrom" in item:
            raise PodSpecError(f"env {item['name']}: valueFrom (secrets, field refs) is not modelled")
        env[item["name"]] = str(item.get("value") or "")
    return env


def _mounts(spec: dict, container: dict, claims: Mapping[str, Path]) -> list[Mount]:
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise PodSpecError(f"volumeMount {mount['name']!r} names no volume of the pod")
        if "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if claim not in claims:
                raise PodSpecError(f"volume {mount['name']!r}: claim {claim!r} is not bound (stand-in claims: {sorted(claims)})")
            host = Path(claims[claim])
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodSpecError(f"volume {mount['name']!r}: {kinds} not modelled (hostPath and persistentVolumeClaim are)")
        if mount.get("subPath"):
            host = host / mount["subPath"]
        if not host.exists():
            raise PodSpecError(f"volume {mount['name']!r}: {host} does not exist on this node")
        mounts.append(Mount(host, mount["mountPath"], bool(mount.get("readOnly"))))
    return mounts


def _user(spec: dict, container: dict) -> tuple[int, int | None] | None:
    context = {**(spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
    if "runAsUser" not in context:
        return None
    return int(context["runAsUser"]), (int(context["runAsGroup"]) if "runAsGroup" in context else None)


def pod_launch(pod: dict, claims: Mapping[str, Path]) -> PodLaunch:
    """The launch of a pod object (as the API stores it, camelCase keys); PodSpecError when not modelled."""
    spec = pod["spec"]
    containers = spec.get("containers") or []
    if len(containers) != 1 or spec.get("initContainers"):
        raise PodSpecError(f"{len(containers)} containers (+ init containers): the stand-in runs exactly one")
    (container,) = containers
    limits = (container.get("resources") or {}).get("limits") or {}
    return PodLaunch(
        name=pod["metadata"]["name"], image=container.get("image") or "",
        command=container.get("command"), args=list(container.get("args") or []), env=_env(container),
        mounts=_mounts(spec, container, claims), working_dir=container.get("workingDir"),
        memory_limit=memory_bytes(limits["memory"]) if "memory" in limits else None,
        cpu_limit=cpu_cores(limits["cpu"]) if "cpu" in limits else None,
        gpus=int(limits.get(GPU_RESOURCE, 0)), user=_user(spec, container))


@dataclass
class Exit:
    code: int
    reason: str  # Completed / Error / OOMKilled, as the kubelet reports a terminated container
    message: str = ""


class RunningPod:
    """A started pod: `wait()` blocks until it exits; `kill()` ends it (pod deletion)."""

    def __init__(self, proc: subprocess.Popen, log_file, on_kill=None):
        self.proc, self._log, self._on_kill = proc, log_file, on_kill
        self.oom_killed = False

    def kill(self) -> None:
        if self._on_kill:
            self._on_kill()
        elif self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # exited meanwhile
                pass

    def _exit(self, rc: int) -> Exit:
        code = 128 - rc if rc < 0 else rc  # a signal: 128 + its number, as a container runtime reports
        if self.oom_killed:
            return Exit(code, "OOMKilled", "the container exceeded its memory limit")
        return Exit(code, "Completed" if code == 0 else "Error")

    def wait(self) -> Exit:
        rc = self.proc.wait()
        self._log.close()
        return self._exit(rc)


class ProcessRuntime:
    """Pods as processes of this machine; `image_env` (PATH, PYTHONPATH, ...) plays the image's env."""

    name = "process"

    def __init__(self, image_env: Mapping[str, str], workdir: Path, rss_poll_s: float = 0.25):
        self.image_env, self.workdir, self.rss_poll_s = dict(image_env), Path(workdir), rss_poll_s

    def start(self, launch: PodLaunch, log_path: Path) -> RunningPod:
        for mount in launch.mounts:
            if str(mount.host) != mount.path.rstrip("/"):
                raise PodSpecError(f"volume at {mount.path}: a process sees host paths, so it must be mounted at "
                                   f"its host path {mount.host} (or use RAG_CLEAN_K8S_STANDIN_RUNTIME=podman)")
        argv = [*(launch.command or []), *launch.args]
        if not argv:
            raise PodSpecError("no command and no args: a process has no image entrypoint to fall back on")
        log = open(log_path, "wb")
        proc = subprocess.Popen(argv, env={**self.image_env, **launch.env}, cwd=launch.working_dir or self.workdir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a kill reaches the children
        pod = RunningPod(proc, log)
        if launch.memory_limit:
            threading.Thread(target=self._watch_memory, args=(pod, launch.memory_limit), daemon=True).start()
        return pod

    def _watch_memory(self, pod: RunningPod, limit: int) -> None:
        import psutil

        try:
            root = psutil.Process(pod.proc.pid)
            while pod.proc.poll() is None:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
                if rss > limit:
                    pod.oom_killed = True
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                    return
                time.sleep(self.rss_poll_s)
        except (psutil.NoSuchProcess, ProcessLookupError):
            return


class PodmanRuntime:
    """Pods as podman containers of their image (root, runc; the image must already be local)."""

    name = "podman"

    def __init__(self, network: str = "host"):
        # host: a pod that talks to the API server (a run pod) reaches it at 127.0.0.1, as pods reach the
        # cluster's API through its service.
        self.network = network

    def argv(self, launch: PodLaunch) -> list[str]:
        argv = [*PODMAN, "run", "--name", launch.name, "--pull", "never", "--network", self.network, *PODMAN_LIMITS]
        if launch.memory_limit:
            argv += ["--memory", str(launch.memory_limit), "--memory-swap", str(launch.memory_limit)]
        if launch.cpu_limit:
            argv += ["--cpus", f"{launch.cpu_limit:g}"]
        if launch.user:
            uid, gid = launch.user
            argv += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        if launch.working_dir:
            argv += ["--workdir", launch.working_dir]
        for key, value in launch.env.items():
            argv += ["--env", f"{key}={value}"]
        for mount in launch.mounts:
            argv += ["--volume", f"{mount.host}:{mount.path}" + (":ro" if mount.read_only else "")]
        if launch.command:
            argv += ["--entrypoint", json.dumps(launch.command)]
        return [*argv, launch.image, *launch.args]

    def start(self, launch: PodLaunch, log_path: Path) -> RunningPod:
        log = open(log_path, "wb")
        proc = subprocess.Popen(self.argv(launch), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        name = launch.name

        def kill():
            subprocess.run([*PODMAN, "kill", name], capture_output=True)

        return _PodmanPod(proc, log, kill, name)


class _PodmanPod(RunningPod):
    def __init__(self, proc, log_file, on_kill, name):
        super().__init__(proc, log_file, on_kill)
        self.container = name

    def wait(self) -> Exit:
        rc = self.proc.wait()
        self._log.close()
        state = subprocess.run([*PODMAN, "inspect", "--format", "{{.State.OOMKilled}} {{.Id}}", self.container],
                               capture_output=True, text=True).stdout.split()
        if len(state) == 2:
            self.oom_killed = state[0] == "true" or (rc == 137 and _memcg_oom_logged(state[1]))
        subprocess.run([*PODMAN, "rm", "-f", self.container], capture_output=True)
        return self._exit(rc)


def _memcg_oom_logged(container_id: str) -> bool:
    """Whether the kernel's OOM killer acted on this container's memory cgroup. Podman 4.3 with runc on
    cgroup v1 leaves State.OOMKilled false after a cgroup OOM kill; the kernel log names the cgroup."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return any("oom-kill:" in line and f"libpod-{container_id}" in line for line in log.splitlines())
