"""Lease settings from the environment: the one place RAG_CLEAN_GPU_* and RAG_CLEAN_FORCE_CPU are read.

Precedence: built-in defaults < environment < explicit (non-None) arguments, so Dagster resource
config overrides the environment.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ENV_DEVICES = "RAG_CLEAN_GPU_DEVICES"
ENV_MEMORY_FRACTION = "RAG_CLEAN_GPU_MEMORY_FRACTION"
ENV_MEMORY_CEILING_MIB = "RAG_CLEAN_GPU_MEMORY_CEILING_MIB"
ENV_TIMEOUT_S = "RAG_CLEAN_GPU_LEASE_TIMEOUT_S"
ENV_FORCE_CPU = "RAG_CLEAN_FORCE_CPU"
ENV_LOCK_DIR = "RAG_CLEAN_GPU_LOCK_DIR"

DEFAULT_TIMEOUT_S: float = 3600

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def default_lock_dir() -> Path:
    """$RAG_CLEAN_GPU_LOCK_DIR, else one machine-wide folder in the temp dir.

    Machine-wide on purpose: a GPU is shared by every checkout, Dagster instance and benchmark on the
    box, so they must all contend for the same lock files.
    """
    explicit = os.environ.get(ENV_LOCK_DIR)
    if explicit:
        return Path(explicit).expanduser()
    return Path(tempfile.gettempdir()) / "rag_clean-gpu-locks"


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of 1/0, true/false, yes/no")


def _parse_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number") from None


def _parse_devices(name: str, raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected comma-separated device indices like '0,1'") from None


# The settings that the environment can supply (LeaseSettings fields besides lock_dir).
LEASE_SETTING_NAMES = ("devices", "memory_fraction", "memory_ceiling_mib", "timeout_s", "force_cpu")


@dataclass(frozen=True)
class LeaseSettings:
    """What a GpuLeaseManager is built from; values are checked by the manager, not here."""

    lock_dir: Path
    devices: list[int] | None = None
    memory_fraction: float | None = None
    memory_ceiling_mib: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    force_cpu: bool = False

    @classmethod
    def from_env(
        cls,
        lock_dir: Path | str | None = None,
        *,
        devices: list[int] | None = None,
        memory_fraction: float | None = None,
        memory_ceiling_mib: int | None = None,
        timeout_s: float | None = None,
        force_cpu: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> "LeaseSettings":
        """Explicit arguments, with each one left None taken from the environment, then the default."""
        env = os.environ if environ is None else environ
        if devices is None and env.get(ENV_DEVICES, "").strip():
            devices = _parse_devices(ENV_DEVICES, env[ENV_DEVICES])
        if memory_fraction is None and env.get(ENV_MEMORY_FRACTION, "").strip():
            memory_fraction = _parse_float(ENV_MEMORY_FRACTION, env[ENV_MEMORY_FRACTION])
        if memory_ceiling_mib is None and env.get(ENV_MEMORY_CEILING_MIB, "").strip():
            memory_ceiling_mib = int(_parse_float(ENV_MEMORY_CEILING_MIB, env[ENV_MEMORY_CEILING_MIB]))
        if timeout_s is None and env.get(ENV_TIMEOUT_S, "").strip():
            timeout_s = _parse_float(ENV_TIMEOUT_S, env[ENV_TIMEOUT_S])
        if force_cpu is None:
            force_cpu = _parse_bool(ENV_FORCE_CPU, env.get(ENV_FORCE_CPU, ""))
        return cls(
            lock_dir=default_lock_dir() if lock_dir is None else Path(lock_dir),
            devices=devices,
            memory_fraction=memory_fraction,
            memory_ceiling_mib=memory_ceiling_mib,
            timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
            force_cpu=force_cpu,
        )
