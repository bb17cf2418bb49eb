"""Loading a sentence-transformers model does not import scikit-learn; sklearn still works when asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from rag_clean.config.registry import load_registry
from rag_clean.encoders.factory import load_dense_encoder
enc = load_dense_encoder(load_registry(sys.argv[1]).dense[0])
assert len(next(iter(enc.encode(["a short text"]))).dense) == 1
print("sklearn loaded after the encode:", "sklearn" in sys.modules)
from sentence_transformers.util import similarity
import numpy as np
d = similarity.pairwise_distances(np.eye(2), metric="manhattan")  # the deferred import, on first call
print("real sklearn after the call:", type(sys.modules["sklearn.metrics"].pairwise_distances).__name__, d.tolist())
"""


def test_dense_load_skips_sklearn_and_defers_it(tiny_registry_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_registry_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sklearn loaded after the encode: False" in out.stdout
    assert "real sklearn after the call: function [[0.0, 2.0], [2.0, 0.0]]" in out.stdout
