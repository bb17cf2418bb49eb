"""Vector index sink (issue 20): full build and a 1%-edit sync into the embedded Qdrant Edge index, and search
latency / recall on it. CPU only, synthetic stored assets (unit vectors, random sparse rows).

Vectors (--data): "clustered" (default), like real embeddings: every chunk belongs to one of n/100 topics
(the same topic in every model), its vector per model is the topic centre plus Gaussian noise of norm
SPREAD, normalized (chunks of one topic: cosine ~0.5); "iid": independent uniform unit vectors, HNSW's
worst case (no neighbourhood structure: the 2nd..10th neighbours of a query are near-ties at cosine ~0).

Per size N: stored assets are written block by block (chunks table, per-model dense + fused Arrow matrices,
a sparse Parquet file); then
  * full build: sync_index into an empty shard (including the HNSW build in commit());
  * edit sync: 1% of the chunks get new text and vectors, synced into the same shard;
  * search: p50 / p99 latency of dense exact, dense approximate (HNSW, hnsw_ef=SEARCH_HNSW_EF), a per-model
    vector (no graph: exact either way), sparse, hybrid (rag_clean.search.pool.rank_pool: the Searcher's
    ranking once the query is encoded; dense exact top 100 + sparse top 100, weighted) and hybrid + rerank
    (its first 20 scored by a tiny random CrossEncoder, tests/tiny_models.py; query encoding not timed);
    recall@10 of approximate against exact (queries: stored fused vectors plus noise of norm 0.3).
Wall, rows/s and peak anonymous RSS (rag_clean.telemetry.memory: mmap'd file pages excluded) per phase.

    python benchmarks/bench_index.py --sizes 20000 [--data clustered|iid] [--dims 384,384] [--sparse-terms 64] [--shards 1,2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from rag_clean.index.base import HNSW_EF_CONSTRUCT, HNSW_M, SEARCH_HNSW_EF, vector_name  # noqa: E402

GEN_BLOCK = 16384
SPREAD = 1.0          # clustered data: noise norm around the topic centre (centre norm 1)
QUERY_NOISE = 0.3     # query = a stored fused vector + noise of this norm


def unit_rows(rng, n: int, d: int):
    import numpy as np

    v = rng.standard_normal((n, d), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def vectors_for(rows, m: int, d: int, data: str, n: int, salt: int):
    """Unit vectors of model m for these rows (salt 0: the original rows, 1: edited rows)."""
    import numpy as np

    rng = np.random.default_rng([m, int(rows[0]) if len(rows) else 0, salt, len(rows)])
    if data == "iid":
        return unit_rows(rng, len(rows), d)
    centres = unit_rows(np.random.default_rng([m, 77]), max(16, n // 100), d)   # same topics in every block
    topics = np.random.default_rng([int(rows[0]) if len(rows) else 0, salt, len(rows)]).integers(0, len(centres), len(rows))
    v = centres[topics] + unit_rows(rng, len(rows), d) * SPREAD
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_sources(folder: Path, n: int, dims: list[int], terms: int, changed, tag: str, data: str = "clustered"):
    """Stored assets of n chunks; rows in `changed` (sorted int array) get other text and vectors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rag_clean.chunking.rows import CHUNK_SCHEMA
    from rag_clean.index.sync import SyncSources
    from rag_clean.retrieval.fusion import fuse_block
    from rag_clean.stages.sparse import sparse_schema
    from rag_clean.storage.embeddings import EmbeddingWriter, read_embeddings

    edited = np.zeros(n, bool)
    edited[changed] = True
    ids = pa.array([f"docs-{i}" for i in range(n)], pa.string())
    texts = [f"chunk {i} about the gpu driver and the index" + (" (edited)" if edited[i] else "") for i in range(n)]
    hashes = pa.array([hashlib.sha256(t.encode()).hexdigest() for t in texts], pa.string())
    chunks = pa.table({"chunk_id": ids, "text": texts, "content_hash": hashes,
                       "source_file": [f"f{i // 50}.md" for i in range(n)],
                       "chunk_index": pa.array([i % 50 for i in range(n)], pa.int32()),
                       "heading": [f"Part {i % 50}" for i in range(n)],
                       "section_path": [["Guide", f"Part {i % 50}"] for i in range(n)],
                       "token_count": pa.array([12] * n, pa.int32()), "metadata_json": ["{}"] * n}, schema=CHUNK_SCHEMA)
    del texts
    models = [f"model-{m}" for m in range(len(dims))]
    writers = [EmbeddingWriter(folder / f"{tag}_{m}.arrow", ids, hashes, d, {"fingerprint": m}) for m, d in zip(models, dims)]
    fused_w = EmbeddingWriter(folder / f"{tag}_fused.arrow", ids, hashes, sum(dims), {"method": "concat"})
    sparse_path = folder / f"{tag}_sparse.parquet"
    sparse_writer = pq.ParquetWriter(str(sparse_path), sparse_schema({"splade": "sp-1"}))
    for start in range(0, n, GEN_BLOCK):
        stop = min(start + GEN_BLOCK, n)
        rows = np.arange(start, stop)
        blocks = []
        for m, (w, d) in enumerate(zip(writers, dims)):
            v = vectors_for(rows, m, d, data, n, 0)
            mask = edited[rows]
            if mask.any():
                v[mask] = vectors_for(rows[mask], m, d, data, n, 1)
            w.write(rows, v)
            blocks.append(v)
        fused_w.write(rows, fuse_block(blocks, [0.5] * len(dims), "concat"))
        rng = np.random.default_rng([9, start])
        t = np.sort(rng.integers(0, 30522, size=(len(rows), terms)), axis=1).astype(np.int32)
        wt = np.sort(rng.random((len(rows), terms), dtype=np.float32), axis=1)[:, ::-1].copy()
        wt[edited[rows]] *= 0.5
        offsets = pa.array(np.arange(0, len(rows) * terms + 1, terms, dtype=np.int32))
        sparse_writer.write_table(pa.table({
            "chunk_id": ids[start:stop], "content_hash": hashes[start:stop], "model": ["splade"] * len(rows),
            "term_ids": pa.ListArray.from_arrays(offsets, pa.array(t.reshape(-1))),
            "weights": pa.ListArray.from_arrays(offsets, pa.array(wt.reshape(-1))),
            "fallback": [False] * len(rows)}, schema=sparse_writer.schema))
    sparse_writer.close()
    sets = {}
    for m, w in zip(models, writers):
        w.finish()
        sets[m] = read_embeddings(w.publish())
    fused_w.finish()
    fused = read_embeddings(fused_w.publish())
    return SyncSources(chunks, fused, sets, pq.ParquetFile(str(sparse_path)), ["splade"])


def timed_sync(index, sources):
    from rag_clean.index.sync import sync_index
    from rag_clean.telemetry.memory import PROBE

    PROBE.take()
    t0 = time.perf_counter()
    result = sync_index(index, sources)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "rows_per_s": round(sources.chunks.num_rows / wall, 1),
            "upserted": result.upserted, "deleted": result.deleted, "unchanged": result.unchanged,
            "rewritten": result.rewritten, "points": result.points, "commit_s": round(result.commit_seconds, 3), "peak_rss_anon_bytes": PROBE.take()}


def latencies(fn, queries) -> dict:
    import numpy as np

    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "queries": len(times)}


def search_figures(index, sources, n_queries: int, reranker_dir: Path) -> dict:
    import numpy as np

    from rag_clean.retrieval.ranking_state import RankingState
    from rag_clean.search.pool import QueryVectors, rank_pool

    rng = np.random.default_rng(5)
    rows = rng.choice(sources.chunks.num_rows, size=n_queries, replace=False)
    noise = rng.standard_normal((n_queries, sources.fused.dim)).astype(np.float32)
    dense_q = np.asarray(sources.fused.vectors[rows]) + noise / np.linalg.norm(noise, axis=1, keepdims=True) * QUERY_NOISE
    dense_q /= np.linalg.norm(dense_q, axis=1, keepdims=True)
    model = next(iter(sources.dense))
    model_q = np.asarray(sources.dense[model].vectors[rows])
    sparse_q = [(np.sort(rng.choice(30522, 16, replace=False)), rng.random(16).astype(np.float32)) for _ in rows]
    texts = [f"how is the gpu driver of part {i % 50} set up" for i in rows]

    def recall(name, queries):
        out = []
        for q in queries:
            exact = {h.chunk_id for h in index.dense_search(name, q, 10, exact=True)}
            approx = {h.chunk_id for h in index.dense_search(name, q, 10, exact=False)}
            out.append(len(exact & approx) / 10)
        return round(float(np.mean(out)), 4)

    state = RankingState(dense_models=tuple(sources.dense), fusion_method="concat",
                         fusion_weights={m: 0.5 for m in sources.dense}, ensemble_weights=None,
                         systems=("dense", "sparse:splade"), weights={"dense": 0.7, "sparse:splade": 0.3}, tuned=False,
                         method="weighted", normalization="minmax", top_k_candidates=100, rrf_k=60,
                         rerank_enabled=True, rerank_top_k=20, rerank_model="tiny", rerank_source="tiny",
                         fingerprints={})

    def hybrid(i):
        # The Searcher's ranking after query encoding (rag_clean.search.pool): each system's top 100 from the
        # index (dense exact, as the Searcher asks), the pool's vectors retrieved, weighted hybrid over them.
        return rank_pool(index, state, QueryVectors(dense_q[i:i + 1], [], [sparse_q[i]]), 100, sources.chunks)

    def hybrid_rerank(i):
        pool = hybrid(i)
        head = pool.candidates[:state.rerank_top_k]
        scores = reranker.predict([(texts[i], pool.points[d]["text"]) for d in head], batch_size=20)
        return np.argsort(-np.asarray(scores))

    reranker = load_reranker(reranker_dir)   # after the builds: torch stays out of their peak RSS
    idx = list(range(n_queries))
    return {"dense_exact": latencies(lambda q: index.dense_search("fused", q, 10, exact=True), dense_q),
            "dense_hnsw": latencies(lambda q: index.dense_search("fused", q, 10, exact=False), dense_q),
            "dense_per_model_no_graph": latencies(lambda q: index.dense_search(vector_name(model), q, 10, exact=False), model_q),
            "sparse": latencies(lambda q: index.sparse_search("splade", q[0], q[1], 10), sparse_q),
            "hybrid": latencies(hybrid, idx),
            "hybrid_rerank": latencies(hybrid_rerank, idx),
            "recall_at_10_hnsw_vs_exact": recall("fused", dense_q),
            "recall_at_10_per_model_approx_vs_exact": recall(vector_name(model), model_q)}


def load_reranker(work: Path):
    """A tiny random CrossEncoder (tests/tiny_models.py), built once under `work`."""
    from sentence_transformers import CrossEncoder

    from tests.tiny_models import build_cross_encoder

    folder = work / "tiny_reranker"
    return CrossEncoder(str(folder if folder.exists() else build_cross_encoder(folder)), device="cpu")


def run_size(n: int, dims: list[int], terms: int, edit: float, n_queries: int, work: Path, data: str,
             shards: int = 1) -> dict:
    import numpy as np

    from rag_clean.index.qdrant_edge import EdgeIndex
    from rag_clean.telemetry.memory import PROBE

    folder = work / f"n{n}"
    folder.mkdir()
    t0 = time.perf_counter()
    base = write_sources(folder, n, dims, terms, np.zeros(0, np.int64), "a", data)
    changed = np.sort(np.random.default_rng(3).choice(n, size=max(1, int(n * edit)), replace=False))
    edited = write_sources(folder, n, dims, terms, changed, "b", data)
    setup = time.perf_counter() - t0
    PROBE.take()
    index = EdgeIndex(folder / "shard", "bench", shards)
    full = timed_sync(index, base)
    sync = timed_sync(index, edited)
    noop = timed_sync(index, edited)
    search = search_figures(index, edited, n_queries, work)
    index.close()
    files = [p.stat() for p in (folder / "shard").rglob("*") if p.is_file()]
    shard_bytes = sum(f.st_blocks * 512 for f in files)          # on disk (Edge preallocates sparse files)
    shard_apparent = sum(f.st_size for f in files)
    out = {"rows": n, "shards": shards, "data": data, "dims": dims, "fused_dim": sum(dims), "sparse_terms": terms, "edited_rows": int(len(changed)),
           "setup_s": round(setup, 1), "full_build": full, "edit_sync": sync, "noop_sync": noop,
           "sync_over_full": round(sync["wall_s"] / full["wall_s"], 4), "search": search, "shard_bytes": shard_bytes, "shard_apparent_bytes": shard_apparent,
           "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    shutil.rmtree(folder)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dims", default="384,384")
    ap.add_argument("--sparse-terms", type=int, default=64)
    ap.add_argument("--edit", type=float, default=0.01)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--data", choices=["clustered", "iid"], default="clustered")
    ap.add_argument("--shards", default="1", help="comma list of Edge shard counts, one full run each (index_shards)")
    ap.add_argument("--workdir", default="", help="where the synthetic assets and the shard go (default: a temp dir)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from rag_clean.telemetry.memory import PROBE

    PROBE.start()
    dims = [int(d) for d in args.dims.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir or None))
    results = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            for shards in (int(k) for k in args.shards.split(",")):
                results.append(run_size(n, dims, args.sparse_terms, args.edit, args.queries, work, args.data, shards))
                first = next(r for r in results if r["rows"] == n)
                results[-1]["full_build_vs_first_shards"] = round(results[-1]["full_build"]["wall_s"] / first["full_build"]["wall_s"], 3)
                print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from importlib.metadata import PackageNotFoundError, version

    try:
        edge_version = version("qdrant-edge-py")
    except PackageNotFoundError:
        edge_version = "unknown"
    report = {"benchmark": "bench_index", "date": date.today().isoformat(), "machine": platform.node(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "qdrant_edge_py": edge_version,
              "hnsw": {"graph": ["fused"], "m": HNSW_M, "ef_construct": HNSW_EF_CONSTRUCT, "hnsw_ef": SEARCH_HNSW_EF},
              "load_avg_before": load_before, "sizes": results}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{date.today().isoformat()}_cpu_index_{args.data}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
