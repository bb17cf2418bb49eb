"""GPU lease: real flock locks across real subprocesses, devices faked by FakeDeviceBackend."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import types
from pathlib import Path

import pytest

from fake_devices import FakeDeviceBackend
from rag_clean.gpu.devices import TorchCudaBackend
from rag_clean.gpu.lease import GpuLeaseManager, LeaseSummary

SPAWN = mp.get_context("spawn")  # a fresh interpreter, like a separate Dagster step process
CHILD_WAIT_S = 60  # children never outlive a stuck test by more than this


def _manager(lock_dir: Path, **kwargs) -> GpuLeaseManager:
    kwargs.setdefault("backend", FakeDeviceBackend(n_devices=2))
    kwargs.setdefault("poll_s", 0.02)
    return GpuLeaseManager(lock_dir, **kwargs)


# ------------------------------------------------------------------ subprocess workers (module level: spawn pickles them by name)


def _hold_lease(lock_dir, n_devices, devices, owner, timeout_s, messages, release):
    manager = GpuLeaseManager(
        lock_dir, devices=devices, timeout_s=timeout_s, poll_s=0.02, backend=FakeDeviceBackend(n_devices=2)
    )

    def forward(ev):
        messages.put(("event", ev.event, ev.detail))

    try:
        with manager.lease(n_devices, owner=owner, on_event=forward) as lease:
            messages.put(("acquired", os.getpid(), lease.devices))
            release.wait(CHILD_WAIT_S)
        messages.put(("summary", lease.summary.to_dict()))
    except Exception as exc:  # report to the parent rather than dying silently
        messages.put(("error", f"{type(exc).__name__}: {exc}"))


def _signal_then_wait(ready, release):
    ready.set()
    release.wait(CHILD_WAIT_S)


def _start_holder(lock_dir, *, n_devices=1, devices=None, owner="holder", timeout_s=30):
    messages, release = SPAWN.Queue(), SPAWN.Event()
    proc = SPAWN.Process(
        target=_hold_lease, args=(str(lock_dir), n_devices, devices, owner, timeout_s, messages, release), daemon=True
    )
    proc.start()
    return proc, messages, release


def _next(messages, kind, timeout=CHILD_WAIT_S):
    """Next message of `kind` from a child, skipping others; fails the test on a child error."""
    while True:
        msg = messages.get(timeout=timeout)
        if msg[0] == "error":
            pytest.fail(f"child failed: {msg[1]}")
        if msg[0] == kind:
            return msg


def _next_event(messages, name, timeout=CHILD_WAIT_S):
    while True:
        msg = _next(messages, "event", timeout)
        if msg[1] == name:
            return msg


# ------------------------------------------------------------------ no CUDA


def test_real_backend_on_cpu_machine_grants_cpu_and_says_why(tmp_path):
    backend = TorchCudaBackend()
    if backend.unavailable_reason() is None:
        pytest.skip("this machine has CUDA")
    manager = GpuLeaseManager(tmp_path / "locks", backend=backend)
    with manager.lease(owner="dense[c1]") as lease:
        assert lease.devices == ["cpu"] and lease.device == "cpu"
        assert lease.is_cpu
    summary = lease.summary
    assert summary.cpu_fallback is True
    assert "no CUDA device" in summary.reason
    assert [e.event for e in summary.events] == ["requested", "cpu_fallback", "acquired", "released"]
    assert summary.vram_before == [] and summary.vram_after == []  # no device, so nothing to measure
    assert not (tmp_path / "locks").exists()  # CPU leases take no lock
    assert json.loads(json.dumps(summary.to_dict()))["holder"]["owner"] == "dense[c1]"


def test_cpu_fallback_disabled_raises(tmp_path):
    manager = _manager(tmp_path, backend=FakeDeviceBackend(n_devices=0), allow_cpu_fallback=False)
    with pytest.raises(RuntimeError, match="no CUDA device.*CPU fallback is disabled"):
        with manager.lease(owner="x"):
            pass


def test_force_cpu_skips_devices(tmp_path):
    backend = FakeDeviceBackend(n_devices=2)
    with _manager(tmp_path, backend=backend, force_cpu=True).lease() as lease:
        assert lease.devices == ["cpu"]
    assert "forced" in lease.summary.reason
    assert backend.calls == []  # no device was touched


# ------------------------------------------------------------------ single process, fake devices


def test_lease_writes_holder_note_applies_ceiling_and_measures(tmp_path):
    backend = FakeDeviceBackend(n_devices=2, total_mib=1000)
    manager = _manager(tmp_path, backend=backend, memory_fraction=0.5)
    with manager.lease(owner="dense/minilm[c1]") as lease:
        assert lease.devices == ["cuda:0"]
        note = json.loads((tmp_path / "device-fake-gpu-0.holder.json").read_text())
        assert note["pid"] == os.getpid() and note["owner"] == "dense/minilm[c1]" and note["device"] == "cuda:0"
        backend.allocate(0, 300)
        lease.record("batch_done", rows=7)
        backend.allocated_mib[0] = 100  # freed some before release
    assert not (tmp_path / "device-fake-gpu-0.holder.json").exists()
    s = lease.summary
    assert isinstance(s, LeaseSummary)
    assert s.cpu_fallback is False and s.reason is None
    assert s.memory_ceiling_fraction == 0.5 and s.memory_ceiling_mib == 500
    assert ("set_memory_fraction", 0, 0.5) in backend.calls
    assert backend.calls[-2:] == [("settle", 0), ("set_memory_fraction", 0, 1.0)]  # ceiling lifted after the lease
    assert [v.used_mib for v in s.vram_before] == [0.0]
    assert [v.used_mib for v in s.vram_after] == [100]
    assert s.vram_peak_torch_mib == {"cuda:0": 300}
    names = [e.event for e in s.events]
    assert names == ["requested", "ceiling_applied", "acquired", "batch_done", "released"]
    assert next(e for e in s.events if e.event == "batch_done").detail == {"rows": 7}
    assert json.loads(json.dumps(s.to_dict()))["vram_after"][0]["source"] == "fake"


def test_ceiling_in_mib_and_fraction_the_stricter_wins(tmp_path):
    backend = FakeDeviceBackend(n_devices=1, total_mib=1000)
    with _manager(tmp_path, backend=backend, memory_fraction=0.5, memory_ceiling_mib=250).lease() as lease:
        pass
    assert lease.summary.memory_ceiling_fraction == 0.25
    assert ("set_memory_fraction", 0, 0.25) in backend.calls


def test_body_error_still_releases_and_is_recorded(tmp_path):
    manager = _manager(tmp_path)
    with pytest.raises(MemoryError):
        with manager.lease(owner="boom") as lease:
            raise MemoryError("CUDA out of memory")
    assert lease.summary.error == "MemoryError: CUDA out of memory"
    assert lease.summary.events[-1].detail["error"].startswith("MemoryError")
    with manager.lease(2) as again:  # both devices free again
        assert again.devices == ["cuda:0", "cuda:1"]


def test_impossible_requests_fail_fast(tmp_path):
    with pytest.raises(ValueError, match="3 device\\(s\\) requested but only 2"):
        with _manager(tmp_path).lease(3):
            pass
    with pytest.raises(ValueError, match="devices \\[5\\] requested but only 2"):
        with _manager(tmp_path, devices=[0, 5]).lease():
            pass
    with pytest.raises(ValueError, match="memory_fraction"):
        _manager(tmp_path, memory_fraction=1.5)


def test_two_threads_of_one_process_are_exclusive(tmp_path):
    manager = _manager(tmp_path, devices=[0])
    with manager.lease(owner="first"):
        with pytest.raises(TimeoutError, match="held by pid %d" % os.getpid()):
            with _manager(tmp_path, devices=[0], timeout_s=0).lease(owner="second"):
                pass


# ------------------------------------------------------------------ env


def test_from_env_reads_overrides_and_explicit_args_win(tmp_path):
    env = {
        "RAG_CLEAN_GPU_DEVICES": "1, 0",
        "RAG_CLEAN_GPU_MEMORY_FRACTION": "0.4",
        "RAG_CLEAN_GPU_LEASE_TIMEOUT_S": "12",
        "RAG_CLEAN_FORCE_CPU": "1",
    }
    m = GpuLeaseManager.from_env(tmp_path, environ=env)
    assert (m.devices, m.memory_fraction, m.timeout_s, m.force_cpu) == ([1, 0], 0.4, 12.0, True)
    m = GpuLeaseManager.from_env(tmp_path, environ=env, devices=[0], timeout_s=3, force_cpu=False)
    assert (m.devices, m.memory_fraction, m.timeout_s, m.force_cpu) == ([0], 0.4, 3, False)
    m = GpuLeaseManager.from_env(tmp_path, environ={})
    assert (m.devices, m.memory_fraction, m.timeout_s, m.force_cpu) == (None, None, 3600, False)


@pytest.mark.parametrize(
    "name,value",
    [
        ("RAG_CLEAN_GPU_DEVICES", "gpu0"),
        ("RAG_CLEAN_GPU_MEMORY_FRACTION", "half"),
        ("RAG_CLEAN_GPU_LEASE_TIMEOUT_S", "soon"),
        ("RAG_CLEAN_FORCE_CPU", "maybe"),
    ],
)
def test_from_env_bad_values_name_the_variable(tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        GpuLeaseManager.from_env(tmp_path, environ={name: value})


# ------------------------------------------------------------------ across processes


def test_second_process_waits_until_holder_releases(tmp_path):
    first, first_msgs, first_release = _start_holder(tmp_path, devices=[0], owner="first")
    second = None
    try:
        first_pid = _next(first_msgs, "acquired")[1]
        second, second_msgs, second_release = _start_holder(tmp_path, devices=[0], owner="second")
        waiting = _next_event(second_msgs, "waiting")
        assert any(f"held by pid {first_pid}" in h and "'first'" in h for h in waiting[2]["holders"])
        first_release.set()
        assert _next(first_msgs, "summary")[1]["devices"] == ["cuda:0"]
        assert _next(second_msgs, "acquired")[2] == ["cuda:0"]
        second_release.set()
        summary = _next(second_msgs, "summary")[1]
        assert [e["event"] for e in summary["events"]] == ["requested", "waiting", "acquired", "released"]
        assert summary["wait_seconds"] > 0
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.join()


def test_sigkilled_holder_frees_devices_at_once(tmp_path):
    holder, msgs, _release = _start_holder(tmp_path, n_devices=2, owner="doomed")
    try:
        holder_pid = _next(msgs, "acquired")[1]
        with pytest.raises(TimeoutError) as excinfo:
            with _manager(tmp_path, timeout_s=0).lease(owner="me"):
                pass
        message = str(excinfo.value)
        assert "owner 'me'" in message and "['cuda:0', 'cuda:1']" in message
        assert f"cuda:0 held by pid {holder_pid}" in message and "owner 'doomed'" in message
        assert str(tmp_path) in message
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.join()
    assert holder.exitcode == -9
    # The stale notes are still on disk, but the kernel dropped the locks: one try is enough.
    assert json.loads((tmp_path / "device-fake-gpu-0.holder.json").read_text())["pid"] == holder_pid
    with _manager(tmp_path, timeout_s=0).lease(2, owner="me") as lease:
        assert lease.devices == ["cuda:0", "cuda:1"]
        assert json.loads((tmp_path / "device-fake-gpu-0.holder.json").read_text())["pid"] == os.getpid()


def test_two_device_request_is_all_or_nothing(tmp_path):
    # A holder on cuda:1; a 2-device request waits without sitting on cuda:0, so a 1-device
    # request for cuda:0 from another process still gets it; once everyone is gone it gets both.
    holder, holder_msgs, holder_release = _start_holder(tmp_path, devices=[1], owner="on-1")
    other = None
    outcome: dict = {}
    started_waiting = threading.Event()

    def want_two():
        def on_event(ev):
            if ev.event == "waiting":
                outcome["waiting_on"] = ev.devices
                started_waiting.set()

        try:
            with _manager(tmp_path, timeout_s=CHILD_WAIT_S).lease(2, owner="pair", on_event=on_event) as lease:
                outcome["devices"] = lease.devices
        except Exception as exc:
            outcome["error"] = exc
            started_waiting.set()

    waiter = threading.Thread(target=want_two)
    try:
        assert _next(holder_msgs, "acquired")[2] == ["cuda:1"]
        waiter.start()
        assert started_waiting.wait(CHILD_WAIT_S) and "error" not in outcome
        assert outcome["waiting_on"] == ["cuda:1"]
        other, other_msgs, other_release = _start_holder(tmp_path, devices=[0], owner="on-0", timeout_s=CHILD_WAIT_S)
        assert _next(other_msgs, "acquired")[2] == ["cuda:0"]
        assert "devices" not in outcome  # still waiting: it needs both
        other_release.set()
        _next(other_msgs, "summary")
        holder_release.set()
        waiter.join(CHILD_WAIT_S)
        assert outcome.get("devices") == ["cuda:0", "cuda:1"], outcome
    finally:
        holder_release.set()
        waiter.join(CHILD_WAIT_S)
        for proc in (holder, other):
            if proc is not None:
                proc.kill()
                proc.join()


def test_forked_child_does_not_inherit_the_lock(tmp_path):
    fork = mp.get_context("fork")
    with _manager(tmp_path, devices=[0]).lease(owner="parent"):
        ready, release = fork.Event(), fork.Event()
        child = fork.Process(target=_signal_then_wait, args=(ready, release), daemon=True)
        child.start()
        assert ready.wait(CHILD_WAIT_S)  # the child runs code, so the after-fork hooks ran
    try:
        # The parent released; a lingering forked child must not keep cuda:0 locked.
        with _manager(tmp_path, devices=[0], timeout_s=0).lease(owner="next") as lease:
            assert lease.devices == ["cuda:0"]
    finally:
        release.set()
        child.join()


# ------------------------------------------------------------------ real backend against stand-ins for torch.cuda / NVML


class _StandInCuda:
    """Just the torch.cuda calls TorchCudaBackend makes, with fixed answers (this machine has no GPU)."""

    def __init__(self, mem_get_info_fails=False):
        self.mem_get_info_fails = mem_get_info_fails

    def get_device_properties(self, index):
        return types.SimpleNamespace(uuid=f"0000000{index}-aaaa-bbbb-cccc-dddddddddddd", total_memory=80 * 2**30)

    def memory_allocated(self, index):
        return 1 * 2**30

    def memory_reserved(self, index):
        return 2 * 2**30

    def mem_get_info(self, index):
        if self.mem_get_info_fails:
            raise RuntimeError("CUDA driver error")
        return (60 * 2**30, 80 * 2**30)


class _StandInNvml:
    def __init__(self, known_uuids):
        self.known_uuids = known_uuids

    def nvmlDeviceGetHandleByUUID(self, device_uuid):
        if device_uuid not in self.known_uuids:
            raise RuntimeError(f"NVML: unknown {device_uuid}")
        return device_uuid

    def nvmlDeviceGetHandleByIndex(self, index):
        raise RuntimeError("not reached when the UUID resolves")

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=30 * 2**30, total=80 * 2**30)


def _backend_with(cuda, nvml):
    backend = TorchCudaBackend()
    backend._torch = lambda: types.SimpleNamespace(cuda=cuda)
    backend._nvml_module = lambda: nvml
    return backend


def test_torch_backend_snapshot_prefers_nvml_then_driver_then_unavailable(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # masked: NVML index != torch index, so only UUIDs map
    uuid0 = "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"
    backend = _backend_with(_StandInCuda(), _StandInNvml({uuid0}))
    assert backend.lock_key(0) == uuid0
    nvml_snap = backend.snapshot(0)
    assert (nvml_snap.source, nvml_snap.used_mib, nvml_snap.total_mib) == ("nvml", 30 * 1024, 80 * 1024)
    assert (nvml_snap.torch_allocated_mib, nvml_snap.torch_reserved_mib) == (1024, 2048)

    unknown_to_nvml = _backend_with(_StandInCuda(), _StandInNvml(set()))
    driver_snap = unknown_to_nvml.snapshot(0)
    assert (driver_snap.source, driver_snap.used_mib, driver_snap.total_mib) == ("torch", 20 * 1024, 80 * 1024)

    nothing = _backend_with(_StandInCuda(mem_get_info_fails=True), None).snapshot(0)
    assert (nothing.source, nothing.used_mib, nothing.total_mib) == ("unavailable", None, None)
    assert nothing.torch_allocated_mib == 1024  # what was measured is still reported
