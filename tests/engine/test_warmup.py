"""The background warm-up: what it imports, when it makes a CUDA context, and that steps wait for it once."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rag_clean.gpu import warmup

ROOT = Path(__file__).resolve().parents[2]


def test_warmup_imports_the_light_stack_in_the_background_and_reports_once(tmp_path):
    # A fresh interpreter: this test process has imported torch long ago.
    code = """
import json, sys
from rag_clean.gpu import warmup
assert "torch" not in sys.modules
first = warmup.start(None)
second = warmup.start(0)
note = warmup.wait(120)
again = warmup.wait(120)
print(json.dumps({"same": first is second, "note": note.text, "cuda_note": note.cuda, "again": again, "problem": first.problem,
                  "steps": sorted(first.steps), "torch": "torch" in sys.modules,
                  "bert": "transformers.models.bert.modeling_bert" in sys.modules,
                  "st": "sentence_transformers" in sys.modules, "cuda_device": first.cuda_device}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"] and got["cuda_device"] is None  # the second start returns the first warm-up
    assert got["problem"] is None
    assert got["torch"] and got["bert"] and not got["st"]
    assert set(got["steps"]) >= {"torch", "transformers", "rag_clean.encoders.factory", "transformers.AutoModel"}
    assert "cuda" not in got["steps"]
    assert got["note"].startswith("warm-up (no CUDA context) ") and "this step waited" in got["note"]
    assert got["again"] is None  # said once per process
    assert got["cuda_note"] is False  # no context made: the step logs it at DEBUG


def test_wait_without_a_warmup_is_silent(monkeypatch):
    monkeypatch.setattr(warmup, "_current", None)
    assert warmup.wait(0.1) is None


def test_a_failing_warmup_is_recorded_not_raised(monkeypatch):
    monkeypatch.setattr(warmup, "MODULES", ("rag_clean.no_such_module_for_warmup",))
    w = warmup.Warmup(None)
    w.run()
    assert w.done.is_set() and w.seconds is not None
    assert w.problem.startswith("ModuleNotFoundError") and "no_such_module_for_warmup" in w.problem
    assert "stopped: ModuleNotFoundError" in w.describe()


class _FakeNvml(types.SimpleNamespace):
    pass


def _nvml(count: int | None):
    def init():
        if count is None:
            raise RuntimeError("NVML Shared Library Not Found")

    return _FakeNvml(nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: count)


@pytest.mark.parametrize(("devices", "count", "visible", "expected"), [
    ([3], 8, None, 3),          # the lease may grant one device: that one
    ([0, 1], 8, None, None),    # several: no context on any
    (None, 1, None, 0),         # one visible card
    (None, 8, None, None),      # a multi-GPU host
    (None, 8, "5", 0),          # masked to one card: torch calls it 0
    (None, 8, "", None),        # masked to none
    (None, None, None, None),   # no driver
])
def test_the_context_is_made_only_where_one_device_can_be_leased(monkeypatch, devices, count, visible, expected):
    monkeypatch.setitem(sys.modules, "pynvml", _nvml(count))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert warmup.single_cuda_device(devices) == expected


def test_a_card_torch_cannot_use_makes_no_context():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's torch can use CUDA")
    w = warmup.Warmup(0)  # NVML said one card; this torch is a CPU-only build (or sees none)
    w.run()
    assert w.problem is None and w.cuda_device is None
    assert w.describe().startswith("warm-up (no CUDA context)")
