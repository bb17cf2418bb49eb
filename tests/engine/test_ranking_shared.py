"""The pieces `reranked` and search share (retrieval/ranking.py, ranking_state.py, search/pool.py), by hand."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.retrieval.candidates import DenseScorer, build_pools
from rag_clean.retrieval.flat import rrf_fuse
from rag_clean.retrieval.ranking import hybrid_candidates, rerank_order
from rag_clean.retrieval.ranking_state import RankingState, RankingStateError, read_ranking_state, write_ranking_state
from rag_clean.search.pool import row_order
from rag_clean.storage.layout import StorageLayout


def _state(**over) -> RankingState:
    values = dict(dense_models=("a", "b"), fusion_method="concat", fusion_weights={"a": 0.8, "b": 0.2},
                  ensemble_weights=None, systems=("dense", "sparse:s"), weights={"dense": 0.4, "sparse:s": 0.6},
                  tuned=True, method="weighted", normalization="minmax", top_k_candidates=50, rrf_k=60,
                  rerank_enabled=True, rerank_top_k=20, rerank_model="r", rerank_source="path:/r",
                  fingerprints={"a": "fa", "b": "fb", "s": "fs", "r": "fr"})
    return RankingState(**(values | over))


def test_ranking_state_round_trips_through_its_file(tmp_path):
    path = StorageLayout(tmp_path).ranking_state_file("docs")
    state = _state(ensemble_weights={"a": 0.7, "b": 0.3})
    write_ranking_state(path, state)
    assert path == tmp_path.resolve() / "state" / "ranking" / "docs.json"
    back = read_ranking_state(path, "docs")
    assert back == state
    assert back.sparse_models == ["s"] and back.system_weights() == [0.4, 0.6]


@pytest.mark.parametrize("content, message", [
    (None, r"collection 'docs': no ranking state at .*docs\.json: materialize `reranked`"),
    ("{not json", r"docs\.json: unreadable ranking state \(JSONDecodeError"),
    (json.dumps({"version": 99}), r"docs\.json: ranking state version 99, expected 1"),
    (json.dumps({"version": 1, "systems": ["dense"]}), r"docs\.json: ranking state lacks \['dense_models'"),
])
def test_a_bad_ranking_state_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "docs.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RankingStateError, match=message) as err:
        read_ranking_state(path, "docs")
    assert "\n" not in str(err.value)


def test_rerank_order_reorders_only_the_head_and_keeps_ties_in_retrieval_order():
    candidates = [[5, 3, 9, 1, 7]]
    scores = [{5: 0.1, 3: 0.9, 9: 0.1}]
    assert rerank_order(candidates, scores, 3) == [[3, 5, 9, 1, 7]]


def test_hybrid_candidates_per_method():
    dense = DenseScorer(np.eye(4, dtype=np.float32), np.array([[0.9, 0.5, 0.1, 0.0]], np.float32))
    dense_top, dense_scores = dense.top_k(3)
    assert dense_top.tolist() == [[0, 1, 2]]
    pools, _ = build_pools(dense_top, dense.scores, [], 3, "minmax")
    sparse_tops = [[np.array([3, 2])]]
    rrf_ids, rrf_scores = hybrid_candidates("rrf", pools, dense_top, dense_scores, sparse_tops, [1.0], 3, 60)
    want, scores = rrf_fuse([dense_top[0], sparse_tops[0][0]], k=60, top_k=3)
    assert rrf_ids == [want] and rrf_scores[0] == pytest.approx({d: scores[d] for d in want})
    ids, by_dense = hybrid_candidates("dense", pools, dense_top, dense_scores, [], [1.0], 3, 60)
    assert ids == [[0, 1, 2]] and by_dense[0][0] == pytest.approx(0.9)
    ids, weighted = hybrid_candidates("weighted", pools, dense_top, dense_scores, [], [1.0], 3, 60)
    assert ids == [[0, 1, 2]] and weighted[0] == pytest.approx({0: 1.0, 1: 0.5, 2: 0.0})
    with pytest.raises(ValueError, match="unknown hybrid method 'mean'"):
        hybrid_candidates("mean", pools, dense_top, dense_scores, [], [1.0], 3, 60)


def test_pool_points_are_numbered_in_chunk_row_order():
    chunks = pa.table({"chunk_id": ["c0", "c1", "c2", "c3"]})
    # Index order c3, c0, c2; "zz" is not in the table (after the rest, by id).
    assert row_order(["c3", "zz", "c0", "c2"], chunks).tolist() == [2, 3, 0, 1]
    assert row_order(["b", "a"], None).tolist() == [1, 0]
