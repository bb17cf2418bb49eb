"""Smoke test of the GPU lease on a real CUDA machine (no Dagster, no pytest needed).

    python benchmarks/lease_gpu_smoke.py [--gib 1] [--memory-fraction 0.5] [--lock-dir DIR]

Acquires a lease on one device, allocates a --gib tensor, checks that a second process cannot take
the same device meanwhile (and names this process as holder), checks the memory ceiling with an
allocation beyond it, releases, and prints the lease summary as JSON with VRAM measured before and
after. Exits 0 when every check passed, 1 when one failed, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, no install

from rag_clean.gpu.devices import TorchCudaBackend  # noqa: E402
from rag_clean.gpu.lease import GpuLeaseManager  # noqa: E402


def _try_second_lease(lock_dir: str, device_index: int, answers) -> None:
    manager = GpuLeaseManager(lock_dir, devices=[device_index], timeout_s=0, allow_cpu_fallback=False)
    try:
        with manager.lease(owner="smoke-second-process"):
            answers.put(("granted", ""))
    except TimeoutError as exc:
        answers.put(("refused", str(exc)))
    except Exception as exc:
        answers.put(("error", f"{type(exc).__name__}: {exc}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test allocation")
    parser.add_argument("--memory-fraction", type=float, default=0.5, help="ceiling applied during the lease")
    parser.add_argument("--lock-dir", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    if not 0 < args.memory_fraction <= 0.8:
        parser.error("--memory-fraction must be in (0, 0.8]: the ceiling check allocates 10% of the device beyond it")

    import torch

    reason = TorchCudaBackend().unavailable_reason()
    if reason is not None:
        print(json.dumps({"ok": False, "reason": reason}))
        return 2

    lock_dir = args.lock_dir or tempfile.mkdtemp(prefix="rag_clean_lease_smoke_")
    manager = GpuLeaseManager(lock_dir, memory_fraction=args.memory_fraction, timeout_s=60, allow_cpu_fallback=False)
    checks: dict[str, bool] = {}
    notes: dict[str, str] = {}
    n_elements = int(args.gib * 2**30) // 4

    with manager.lease(owner="lease_gpu_smoke") as lease:
        index = int(lease.device.split(":")[1])
        tensor = torch.ones(n_elements, dtype=torch.float32, device=lease.device)
        torch.cuda.synchronize(index)
        lease.record("allocated", mib=tensor.numel() * 4 / 2**20)

        ctx = mp.get_context("spawn")
        answers = ctx.Queue()
        second = ctx.Process(target=_try_second_lease, args=(lock_dir, index, answers))
        second.start()
        verdict, message = answers.get(timeout=120)
        second.join()
        checks["second_process_refused"] = verdict == "refused" and f"pid {os.getpid()}" in message
        notes["second_process"] = f"{verdict}: {message}"

        total = torch.cuda.get_device_properties(index).total_memory
        too_big = int(total * (args.memory_fraction + 0.1)) // 4
        try:
            over = torch.empty(too_big, dtype=torch.float32, device=lease.device)
            del over
            checks["ceiling_enforced"] = False
            notes["ceiling"] = f"allocating {too_big * 4 / 2**30:.1f} GiB beyond the ceiling succeeded"
        except torch.OutOfMemoryError as exc:
            checks["ceiling_enforced"] = True
            notes["ceiling"] = f"OOM as expected: {str(exc).splitlines()[0][:200]}"
        del tensor

    summary = lease.summary.to_dict()
    before, after = summary["vram_before"][0], summary["vram_after"][0]
    peak = summary["vram_peak_torch_mib"][lease.device]
    checks["vram_measured"] = all(
        snap["source"] in ("nvml", "torch") and snap["used_mib"] is not None and snap["total_mib"]
        for snap in (before, after)
    )
    checks["peak_covers_allocation"] = peak is not None and peak >= args.gib * 1024 * 0.99
    checks["cache_emptied_on_release"] = (after["torch_reserved_mib"] or 0.0) < args.gib * 1024 * 0.5
    checks["holder_note_removed"] = not list(Path(lock_dir).glob("*.holder.json"))
    try:  # a zero-timeout lease succeeds only if the lock really dropped
        with GpuLeaseManager(lock_dir, devices=[index], timeout_s=0, allow_cpu_fallback=False).lease(owner="again"):
            checks["lock_free_after_release"] = True
    except TimeoutError as exc:
        checks["lock_free_after_release"] = False
        notes["lock_free_after_release"] = str(exc)

    print(json.dumps({"ok": all(checks.values()), "checks": checks, "notes": notes, "summary": summary}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
