"""Fusion: concat keeps cosine = weighted sum of per-model cosines; mean needs equal dims; truncation."""

from __future__ import annotations

import numpy as np
import pytest

from rag_clean.retrieval.fusion import fuse_block, fused_dim, l2_normalize, normalized_weights, truncate_and_normalize


def _unit(rng, n, d):
    return l2_normalize(rng.standard_normal((n, d)).astype(np.float32))


def test_concat_cosine_is_weighted_sum_of_model_cosines():
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 10, 32), _unit(rng, 10, 48)  # different widths combine
    fused = fuse_block([a, b], [0.8, 0.2], "concat")
    assert fused.shape == (10, 80) and fused.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-6)
    got = fused @ fused.T
    want = 0.8 * (a @ a.T) + 0.2 * (b @ b.T)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_concat_weights_are_normalized():
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 4, 8), _unit(rng, 4, 8)
    np.testing.assert_allclose(fuse_block([a, b], [4, 1], "concat"), fuse_block([a, b], [0.8, 0.2], "concat"), atol=1e-7)
    np.testing.assert_allclose(normalized_weights([3, 1]), [0.75, 0.25])


def test_mean_is_renormalized_weighted_mean():
    rng = np.random.default_rng(2)
    a, b = _unit(rng, 5, 16), _unit(rng, 5, 16)
    fused = fuse_block([a, b], [0.25, 0.75], "mean")
    want = 0.25 * a + 0.75 * b
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(fused, want, atol=1e-6)
    assert fused_dim([16, 16], "mean") == 16 and fused_dim([16, 24], "concat") == 40


def test_mean_refuses_unequal_dims():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match=r"'mean' needs equal dimensions, got \[32, 48\]; use 'concat'"):
        fuse_block([_unit(rng, 2, 32), _unit(rng, 2, 48)], [0.5, 0.5], "mean")


@pytest.mark.parametrize("weights", [[1.0, 0.0], [1.0, -0.5]])
def test_non_positive_weights_refused(weights):
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="fusion weights must be > 0"):
        fuse_block([_unit(rng, 2, 4), _unit(rng, 2, 4)], weights, "concat")


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="unknown fusion method 'max'"):
        fused_dim([4], "max")
    with pytest.raises(ValueError, match="unknown fusion method 'max'"):
        fuse_block([np.ones((1, 4), np.float32)], [1.0], "max")


def test_truncate_keeps_prefix_and_renormalizes():
    rng = np.random.default_rng(5)
    v = _unit(rng, 6, 64)
    t = truncate_and_normalize(v, 16, model="m")
    assert t.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(t, v[:, :16] / np.linalg.norm(v[:, :16], axis=1, keepdims=True), atol=1e-6)
    assert truncate_and_normalize(v, None) is v and truncate_and_normalize(v, 64) is v


def test_truncate_refuses_padding():
    with pytest.raises(ValueError, match=r"model 'm': Matryoshka target dim 128 exceeds the model's 64; vectors are never padded"):
        truncate_and_normalize(np.ones((2, 64), np.float32), 128, model="m")
