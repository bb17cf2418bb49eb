"""Dense and sparse stages on a real local Ray cluster (2 CPU workers, tiny models) match the in-process path,
reuse happens before sharding, and a worker that dies mid-run is retried without losing or duplicating rows.

Tolerance: sharding changes which texts share a batch (and so the padded length) and Ray workers run
torch with one thread, so vectors may differ from the in-process ones in the last float bits. Stated
tolerance: |a - b| <= 1e-5 per component of the L2-normalized fp32 vectors (the same for sparse weights);
sparse term ids per chunk are equal. With one shard (the same batches) the dense file is byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pyarrow as pa
import pytest

ray = pytest.importorskip("ray")

from rag_clean.distributed import ray_encode  # noqa: E402
from rag_clean.config.plan import RayPlan  # noqa: E402
from stage_helpers import dense as run_dense, sparse as run_sparse  # noqa: E402
from rag_clean.storage.digests import file_digest  # noqa: E402
from rag_clean.storage.embeddings import EmbeddingWriter, read_embeddings  # noqa: E402
from tiny_models import TEST_WORDS  # noqa: E402

ATOL = 1e-5
N_CHUNKS = 240
PLAN = RayPlan(address="local", shard_rows=32, actors=2)   # 8 shards over 2 actors
# The session's local cluster (tests/conftest.py: 2 CPUs = 2 actors), no warm worker from another module.
pytestmark = pytest.mark.usefixtures("ray_workers")


def _chunks(seed: int = 0, n: int = N_CHUNKS, changed: set[int] = frozenset()) -> pa.Table:
    """Texts of 1..40 words; rows in `changed` get other text (so another content hash)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(TEST_WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    texts = [f"changed gpu driver {i} " + t if i in changed else t for i, t in enumerate(texts)]
    return pa.table({
        "chunk_id": [f"c{i:04d}" for i in range(n)],
        "text": texts,
        "content_hash": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
        "metadata_json": ["{}"] * n,
    })


def _on(ray: RayPlan | None) -> dict:
    """The settings that put a stage on `ray` (none: in-process)."""
    return {} if ray is None else {"ray_address": ray.address, "ray_shard_rows": ray.shard_rows, "ray_actors": ray.actors}


def _dense(spec, chunks, path, previous=None, ray=None):
    writer, record = run_dense(spec, chunks, path, previous, **_on(ray))
    return read_embeddings(writer.publish()), record


def _assert_same_vectors(a, b, atol=ATOL):
    assert a.chunk_ids == b.chunk_ids and a.content_hashes == b.content_hashes and a.metadata == b.metadata
    assert a.vectors.shape == b.vectors.shape
    diff = float(np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max())
    assert diff <= atol, f"max |diff| {diff} > {atol}"
    return diff


def test_dense_on_ray_matches_in_process(registry, tmp_path):
    spec = registry.get("tiny-a")
    chunks = _chunks()
    local, _ = _dense(spec, chunks, tmp_path / "local.arrow")
    remote, record = _dense(spec, chunks, tmp_path / "ray.arrow", ray=PLAN)
    _assert_same_vectors(local, remote)
    assert record.computed == N_CHUNKS and record.reused == 0
    assert record.encode.items == N_CHUNKS                       # every row encoded exactly once
    assert record.device == "ray[2 actors]:cpu"


def test_dense_one_shard_is_byte_identical(registry, tmp_path):
    """Same batches (one shard holds every row): the file is byte for byte the in-process one."""
    spec = registry.get("tiny-b")
    chunks = _chunks(seed=1, n=60)
    w_local, _ = run_dense(spec, chunks, tmp_path / "local.arrow")
    w_ray, _ = run_dense(spec, chunks, tmp_path / "ray.arrow", **_on(RayPlan(address="local", shard_rows=1000, actors=1)))
    assert file_digest(w_local.publish()) == file_digest(w_ray.publish())


def test_only_changed_rows_go_to_ray(registry, tmp_path):
    spec = registry.get("tiny-a")
    previous, _ = _dense(spec, _chunks(), tmp_path / "v1.arrow")
    changed = set(range(3, N_CHUNKS, 12))                        # 20 rows spread over the collection
    chunks = _chunks(changed=changed)
    local, local_rec = _dense(spec, chunks, tmp_path / "v2_local.arrow", previous=tmp_path / "v1.arrow")
    remote, record = _dense(spec, chunks, tmp_path / "v2_ray.arrow", previous=tmp_path / "v1.arrow", ray=PLAN)
    assert (record.reused, record.computed) == (local_rec.reused, local_rec.computed) == (N_CHUNKS - len(changed), len(changed))
    assert record.encode.items == len(changed)                   # Ray saw the changed rows only
    _assert_same_vectors(local, remote)
    kept = [i for i in range(N_CHUNKS) if i not in changed]
    assert np.array_equal(np.asarray(remote.vectors)[kept], np.asarray(previous.vectors)[kept])  # reused bit for bit


def _rows_by_chunk(table: pa.Table) -> dict:
    return {r["chunk_id"]: (r["term_ids"], r["weights"]) for r in table.to_pylist()}


def test_sparse_on_ray_matches_in_process(registry, tmp_path):
    spec = registry.get("tiny-splade")
    chunks = _chunks(seed=2)
    local, local_rec = run_sparse([spec], chunks, root=tmp_path / "local")
    remote, record = run_sparse([spec], chunks, root=tmp_path / "ray", **_on(PLAN))
    assert not record.fallback_used and record.status == "ok"
    assert remote.num_rows == local.num_rows == N_CHUNKS
    a, b = _rows_by_chunk(local), _rows_by_chunk(remote)          # file order differs: readers join on chunk_id
    assert a.keys() == b.keys()
    for cid in a:
        assert a[cid][0] == b[cid][0], cid                          # same terms, heaviest first
        np.testing.assert_allclose(a[cid][1], b[cid][1], atol=ATOL, rtol=0)
    assert record.vectors_available == local_rec.vectors_available
    assert record.per_model[spec.name]["items"] == N_CHUNKS
    assert record.devices == ["ray[2 actors]:cpu"]


def _crash_once_loader(marker: str):
    """A loader whose encoder kills its worker process on the first shard any actor gets (only once:
    the marker file is created atomically). Built as a closure so Ray ships it by value."""
    def load(spec, device, **kwargs):
        from rag_clean.encoders.factory import load_dense_encoder

        encoder = load_dense_encoder(spec, device, **kwargs)
        real = encoder.encode

        def encode(texts):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                yield from real(texts)
                return
            os._exit(1)   # the worker process dies mid-run, as on a lost node or an OOM kill

        encoder.encode = encode
        return encoder
    return load


def _encode_into_writer(encoder, texts, like, path, on_shard=None):
    """What run_dense_stage does with an encoder, for an encoder built with a test loader."""
    writer = EmbeddingWriter(path, like.chunk_ids, like.content_hashes, encoder.dim, dict(like.metadata))
    for n, batch in enumerate(encoder.encode(texts)):
        writer.write(batch.rows, batch.dense)                        # raises on a row written twice
        if on_shard is not None:
            on_shard(n)
    return writer


def test_worker_process_killed_mid_run_is_restarted(registry, tmp_path):
    """A worker's process dies on its first shard: Ray restarts it (the model reloads) and re-runs
    the shard; every row lands exactly once and the file matches the in-process one."""
    spec = registry.get("tiny-a")
    chunks = _chunks(seed=3)
    local, _ = _dense(spec, chunks, tmp_path / "local.arrow")
    marker = tmp_path / "crashed"
    encoder = ray_encode.ray_dense_encoder(spec, PLAN, loader=_crash_once_loader(str(marker)))
    try:
        writer = _encode_into_writer(encoder, chunks.column("text").to_pylist(), local, tmp_path / "ray.arrow")
        shard_pids = {pid for _, pid in encoder.shard_workers}
        workers, items = len(encoder._actors), encoder.stats.items
    finally:
        encoder.close()
    remote = read_embeddings(writer.publish())                       # finish() raises on a missing row
    assert marker.exists()
    assert workers == 2 and shard_pids - set(encoder.actor_pids)     # a restarted process encoded shards
    assert items == N_CHUNKS and len(encoder.shard_workers) == -(-N_CHUNKS // PLAN.shard_rows)
    _assert_same_vectors(local, remote)


def test_worker_lost_for_good_moves_its_shards(registry, tmp_path):
    """A worker killed for good mid-run (no restart): its queued shards are resubmitted to the other.
    Last in the module: it leaves the pool one worker short."""
    spec = registry.get("tiny-a")
    chunks = _chunks(seed=4)
    local, _ = _dense(spec, chunks, tmp_path / "local.arrow")
    encoder = ray_encode.ray_dense_encoder(spec, PLAN)
    victim = encoder._actors[0]

    def kill_after_first(n):
        if n == 0:
            ray.kill(victim, no_restart=True)

    try:
        writer = _encode_into_writer(encoder, chunks.column("text").to_pylist(), local, tmp_path / "ray.arrow",
                                     on_shard=kill_after_first)
        workers, items = len(encoder._actors), encoder.stats.items
    finally:
        encoder.close()
    remote = read_embeddings(writer.publish())
    assert workers == 1 and victim not in encoder._actors
    assert items == N_CHUNKS and len(encoder.shard_workers) == -(-N_CHUNKS // PLAN.shard_rows)
    _assert_same_vectors(local, remote)
