"""Engine: inputs reach the GPU through reused pinned buffers (encoders.device.PinnedStaging). Needs CUDA:
skipped on a machine without it (the device runs of docs/performance.md run it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rag_clean.encoders.device import PinnedStaging

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_every_batch_arrives_intact_while_slots_are_reused_and_grown():
    device = torch.device("cuda:0")
    staging = PinnedStaging(device)
    rng = np.random.default_rng(0)
    sent, got = [], []
    for i in range(40):
        n = int(rng.integers(0, 5000)) if i % 7 else 70_000  # shrinking, growing, empty batches
        batch = {"input_ids": rng.integers(0, 30000, n, dtype=np.int32),
                 "cu_seqlens": np.cumsum(rng.integers(1, 9, 1 + n % 13)).astype(np.int32),
                 "positions": rng.integers(0, 512, (max(n // 10, 1), 3)).astype(np.int64), "max_len": 7}
        out = staging.to_device(batch)
        sent.append(batch)
        got.append(out)
    torch.cuda.synchronize()
    for batch, out in zip(sent, got):  # every earlier batch still holds its own values
        assert out["max_len"] == 7
        for key in ("input_ids", "cu_seqlens", "positions"):
            assert out[key].device.type == "cuda" and out[key].dtype == torch.from_numpy(batch[key]).dtype
            assert np.array_equal(out[key].cpu().numpy(), batch[key])
    assert len(staging.slots) == 6  # two slots per input name, whatever the number of batches
