"""Lease settings: the declared RAG_CLEAN_GPU_* / RAG_CLEAN_FORCE_CPU settings (rag_clean.config.declaration),
read through the one strict parser.

Precedence: built-in defaults < environment < explicit (non-None) arguments, so Dagster resource
config overrides the environment.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.settings import process_setting

ENV_FORCE_CPU = BY_KEY["force_cpu"].env
DEFAULT_TIMEOUT_S: float = BY_KEY["gpu_lease_timeout_s"].default


def default_lock_dir() -> Path:
    """$RAG_CLEAN_GPU_LOCK_DIR, else one machine-wide folder in the temp dir.

    Machine-wide on purpose: a GPU is shared by every checkout, Dagster instance and benchmark on the
    box, so they must all contend for the same lock files.
    """
    explicit = process_setting("gpu_lock_dir")
    if explicit:
        return Path(explicit).expanduser()
    return Path(tempfile.gettempdir()) / "rag_clean-gpu-locks"


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
        if devices is None:
            devices = process_setting("gpu_devices", environ)
            devices = None if devices is None else list(devices)
        if memory_fraction is None:
            memory_fraction = process_setting("gpu_memory_fraction", environ)
        if memory_ceiling_mib is None:
            memory_ceiling_mib = process_setting("gpu_memory_ceiling_mib", environ)
        if timeout_s is None:
            timeout_s = process_setting("gpu_lease_timeout_s", environ)
        if force_cpu is None:
            force_cpu = process_setting("force_cpu", environ)
        return cls(
            lock_dir=default_lock_dir() if lock_dir is None else Path(lock_dir),
            devices=devices,
            memory_fraction=memory_fraction,
            memory_ceiling_mib=memory_ceiling_mib,
            timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
            force_cpu=force_cpu,
        )
