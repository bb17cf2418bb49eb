"""GpuLeaseResource: config/env precedence, owner labels and run-log lines from a real materialization."""

import json
import logging

from pathlib import Path

import dagster as dg
import pytest

from fake_devices import FakeDeviceBackend
from rag_clean.gpu.devices import TorchCudaBackend
from resources.gpu_lease import GpuLeaseResource

PARTITIONS = dg.StaticPartitionsDefinition(["c1"])


class FakeGpuLeaseResource(GpuLeaseResource):
    """Two simulated CUDA devices, real lock files."""

    fake_devices: int = 2

    def _backend(self):
        return FakeDeviceBackend(n_devices=self.fake_devices)


@dg.asset(partitions_def=PARTITIONS)
def leased_step(context: dg.AssetExecutionContext, gpu: GpuLeaseResource) -> dg.MaterializeResult:
    with gpu.lease(context, n_devices=2) as lease:
        devices = lease.devices
        holder_note = None
        note_file = gpu.lock_path() / "device-fake-gpu-0.holder.json"
        if note_file.exists():
            holder_note = json.loads(note_file.read_text())
    return dg.MaterializeResult(
        metadata={
            "devices": devices,
            "lease": dg.MetadataValue.json(lease.summary.to_dict()),
            "holder_note": dg.MetadataValue.json(holder_note or {}),
        }
    )


def _materialize(resource):
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([leased_step], partition_key="c1", resources={"gpu": resource}, instance=instance)
    assert result.success
    metadata = result.asset_materializations_for_node("leased_step")[0].metadata
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    return metadata, logs


def test_asset_leases_fake_devices_and_logs_acquire_release(tmp_path):
    metadata, logs = _materialize(FakeGpuLeaseResource(lock_dir=str(tmp_path), memory_fraction=0.5))
    summary = metadata["lease"].value
    assert summary["devices"] == ["cuda:0", "cuda:1"] and summary["cpu_fallback"] is False
    assert summary["memory_ceiling_fraction"] == 0.5
    owner = summary["holder"]["owner"]
    assert owner.startswith("leased_step[c1] run ")
    assert metadata["holder_note"].value["owner"] == owner  # the note humans read names the asset + partition
    assert any("acquired ['cuda:0', 'cuda:1']" in m and owner in m for m in logs)
    assert any("memory ceiling" in m and "0.500" in m for m in logs)
    assert any("released ['cuda:0', 'cuda:1']" in m for m in logs)
    assert list(tmp_path.glob("*.holder.json")) == []  # notes removed on release


@dg.asset(partitions_def=PARTITIONS)
def second_leased_step(context: dg.AssetExecutionContext, gpu: GpuLeaseResource) -> None:
    with gpu.lease(context):
        pass


def test_asset_on_machine_without_cuda_says_cpu_once_per_run_at_info(tmp_path):
    if TorchCudaBackend().unavailable_reason() is None:
        pytest.skip("this machine has CUDA")
    metadata, _ = _materialize(GpuLeaseResource(lock_dir=str(tmp_path)))
    summary = metadata["lease"].value
    assert summary["devices"] == ["cpu"] and summary["cpu_fallback"] is True
    # Two leased steps in one run: the CPU is said once, at INFO, and no line reads like a wait for a GPU.
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([leased_step, second_leased_step], partition_key="c1", instance=instance,
                            resources={"gpu": GpuLeaseResource(lock_dir=str(tmp_path))})
    entries = [e for e in instance.all_logs(result.run_id) if e.user_message and not e.is_dagster_event]
    cpu = [e for e in entries if "running on CPU" in e.user_message and e.level >= logging.INFO]
    assert len(cpu) == 1 and cpu[0].level == logging.INFO and "no CUDA device" in cpu[0].user_message
    assert not [e for e in entries if e.level >= logging.WARNING]
    assert not [e for e in entries if e.level >= logging.INFO and "acquired ['cpu']" in e.user_message]


def test_waiting_is_logged_with_the_holder(tmp_path):
    resource = FakeGpuLeaseResource(lock_dir=str(tmp_path), fake_devices=1, timeout_s=0)
    messages: list[str] = []

    class Log:
        def info(self, msg):
            messages.append(msg)

        warning = info

    class Context:  # the two things the resource reads from a context besides the owner
        log = Log()
        run_id = "abcdef0123456789"

    with resource.lease("other-step"):
        with pytest.raises(TimeoutError, match="owner 'other-step'"):
            with resource.lease(Context()):
                pass
    assert any("waiting for 1 device(s)" in m and "owner 'other-step'" in m for m in messages)


def test_fields_override_env_and_unset_fields_read_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_CLEAN_GPU_MEMORY_FRACTION", "0.3")
    monkeypatch.setenv("RAG_CLEAN_GPU_LEASE_TIMEOUT_S", "7")
    monkeypatch.setenv("RAG_CLEAN_GPU_DEVICES", "1")
    manager = GpuLeaseResource(lock_dir=str(tmp_path)).manager()
    assert (manager.memory_fraction, manager.timeout_s, manager.devices) == (0.3, 7.0, [1])
    manager = GpuLeaseResource(lock_dir=str(tmp_path), memory_fraction=0.6, timeout_s=2, devices=[0]).manager()
    assert (manager.memory_fraction, manager.timeout_s, manager.devices) == (0.6, 2, [0])
    monkeypatch.setenv("RAG_CLEAN_FORCE_CPU", "1")
    with FakeGpuLeaseResource(lock_dir=str(tmp_path)).lease("x") as lease:
        assert lease.devices == ["cpu"]


def test_default_lock_dir_is_machine_wide_unless_overridden(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.delenv("RAG_CLEAN_GPU_LOCK_DIR", raising=False)
    assert GpuLeaseResource().lock_path() == Path(tempfile.gettempdir()) / "rag_clean-gpu-locks"
    monkeypatch.setenv("RAG_CLEAN_GPU_LOCK_DIR", str(tmp_path / "locks"))
    assert GpuLeaseResource().lock_path() == tmp_path / "locks"
    assert GpuLeaseResource(lock_dir=str(tmp_path / "x")).lock_path() == tmp_path / "x"


def test_resource_initialises_from_init_context(tmp_path):
    # The path Dagster takes when it builds the resource for a run.
    context = dg.build_init_resource_context()
    resource = GpuLeaseResource(lock_dir=str(tmp_path), timeout_s=5).with_resource_context(context)
    with resource.lease("direct") as lease:
        assert lease.devices
    assert lease.summary.holder["owner"] == "direct"


def test_a_run_warms_in_the_background_and_its_first_gpu_step_says_so(pipeline, monkeypatch):
    from rag_clean.gpu import warmup

    monkeypatch.setattr(warmup, "_current", None)  # as in a fresh run process
    result = pipeline.materialize("demo")
    started = warmup._current
    assert started is not None and started.done.is_set() and started.problem is None
    notes = [e for e in pipeline.instance.all_logs(result.run_id)
             if e.user_message and e.user_message.startswith("warm-up (")]
    assert len(notes) == 1 and "this step waited" in notes[0].user_message  # once, by the first leased step
    # No CUDA context here (no GPU, or tests' fake-free CPU run): a detail, said at DEBUG, not in the main log.
    assert notes[0].level == (logging.INFO if "(cuda:" in notes[0].user_message else logging.DEBUG)
    first_gpu_step = min((e.timestamp, e.step_key) for e in pipeline.instance.all_logs(result.run_id)
                         if e.step_key and e.step_key.startswith(("dense_embeddings", "sparse_vectors", "reranked")))
    assert notes[0].step_key == first_gpu_step[1]


def test_warmup_off_starts_nothing(tmp_path, monkeypatch):
    from rag_clean.gpu import warmup

    monkeypatch.setattr(warmup, "_current", None)
    monkeypatch.setenv("RAG_CLEAN_WARMUP", "0")
    GpuLeaseResource(lock_dir=str(tmp_path)).setup_for_execution(None)
    assert warmup._current is None
    monkeypatch.setenv("RAG_CLEAN_WARMUP", "1")
    GpuLeaseResource(lock_dir=str(tmp_path), force_cpu=True).setup_for_execution(None)
    assert warmup._current is not None and warmup._current.cuda_device is None  # CPU forced: no context
    warmup.wait(120)
