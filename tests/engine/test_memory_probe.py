"""The peak anonymous RSS probe sees heap growth and not memory-mapped file pages."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rag_clean.telemetry.memory import PeakRssAnon, rss_anon_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_peak_counts_heap_and_not_mapped_file_pages(tmp_path):
    probe = PeakRssAnon(interval_s=0.001).start()
    probe.take()
    heap = np.ones(64 * 2 ** 20 // 8)  # 64 MiB of anonymous memory, touched
    del heap
    assert probe.take() - rss_anon_bytes() > 48 * 2 ** 20
    path = tmp_path / "big.npy"
    np.save(path, np.ones(64 * 2 ** 20 // 8))
    mapped = np.load(path, mmap_mode="r")
    base = probe.take()
    assert float(mapped.sum()) == 64 * 2 ** 20 // 8  # every page read, file-backed
    assert probe.take() - base < 16 * 2 ** 20
