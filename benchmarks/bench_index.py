"""Vector index sink (issue 20): full build and a 1%-edit sync into the embedded Qdrant Edge index, and search
latency / recall on it. CPU only, synthetic stored assets (random unit vectors, random sparse rows).

Per size N: stored assets are written block by block (chunks table, per-model dense + fused Arrow matrices,
a sparse Parquet file); then
  * full build: sync_index into an empty shard (including the HNSW build in commit());
  * edit sync: 1% of the chunks get new text and vectors, synced into the same shard;
  * search: p50 / p99 latency of dense exact, dense approximate (HNSW) and sparse queries, and recall@10 of
    approximate against exact (queries: stored fused vectors plus noise of norm ~0.28, so each has a true nearest neighbour).
Wall, rows/s and peak anonymous RSS (rag_clean.telemetry.memory: mmap'd file pages excluded) per phase.

    python benchmarks/bench_index.py --sizes 20000 [--dims 384,384] [--sparse-terms 64] [--edit 0.01]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

GEN_BLOCK = 16384


def write_sources(folder: Path, n: int, dims: list[int], terms: int, changed, tag: str):
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
            v = np.random.default_rng([m, start]).standard_normal((len(rows), d), dtype=np.float32)
            mask = edited[rows]
            if mask.any():
                v[mask] = np.random.default_rng([m, start, 1]).standard_normal((int(mask.sum()), d), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
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


def search_figures(index, sources, n_queries: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(5)
    rows = rng.choice(sources.chunks.num_rows, size=n_queries, replace=False)
    dense_q = np.asarray(sources.fused.vectors[rows]) + rng.standard_normal((n_queries, sources.fused.dim)).astype(np.float32) * 0.01
    dense_q /= np.linalg.norm(dense_q, axis=1, keepdims=True)
    sparse_q = [(np.sort(rng.choice(30522, 16, replace=False)), rng.random(16).astype(np.float32)) for _ in rows]
    recalls = []
    for q in dense_q:
        exact = {h.chunk_id for h in index.dense_search("fused", q, 10, exact=True)}
        approx = {h.chunk_id for h in index.dense_search("fused", q, 10, exact=False)}
        recalls.append(len(exact & approx) / 10)
    return {"dense_exact": latencies(lambda q: index.dense_search("fused", q, 10, exact=True), dense_q),
            "dense_hnsw": latencies(lambda q: index.dense_search("fused", q, 10, exact=False), dense_q),
            "sparse": latencies(lambda q: index.sparse_search("splade", q[0], q[1], 10), sparse_q),
            "recall_at_10_hnsw_vs_exact": round(float(np.mean(recalls)), 4)}


def run_size(n: int, dims: list[int], terms: int, edit: float, n_queries: int, work: Path) -> dict:
    import numpy as np

    from rag_clean.index.qdrant_edge import EdgeIndex
    from rag_clean.telemetry.memory import PROBE

    folder = work / f"n{n}"
    folder.mkdir()
    t0 = time.perf_counter()
    base = write_sources(folder, n, dims, terms, np.zeros(0, np.int64), "a")
    changed = np.sort(np.random.default_rng(3).choice(n, size=max(1, int(n * edit)), replace=False))
    edited = write_sources(folder, n, dims, terms, changed, "b")
    setup = time.perf_counter() - t0
    PROBE.take()
    index = EdgeIndex(folder / "shard", "bench")
    full = timed_sync(index, base)
    sync = timed_sync(index, edited)
    noop = timed_sync(index, edited)
    search = search_figures(index, edited, n_queries)
    index.close()
    shard_bytes = sum(p.stat().st_size for p in (folder / "shard").rglob("*") if p.is_file())
    out = {"rows": n, "dims": dims, "fused_dim": sum(dims), "sparse_terms": terms, "edited_rows": int(len(changed)),
           "setup_s": round(setup, 1), "full_build": full, "edit_sync": sync, "noop_sync": noop,
           "sync_over_full": round(sync["wall_s"] / full["wall_s"], 4), "search": search, "shard_bytes": shard_bytes}
    shutil.rmtree(folder)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dims", default="384,384")
    ap.add_argument("--sparse-terms", type=int, default=64)
    ap.add_argument("--edit", type=float, default=0.01)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workdir", default="", help="where the synthetic assets and the shard go (default: a temp dir)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from rag_clean.telemetry.memory import PROBE

    PROBE.start()
    dims = [int(d) for d in args.dims.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir or None))
    results = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results.append(run_size(n, dims, args.sparse_terms, args.edit, args.queries, work))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from importlib.metadata import PackageNotFoundError, version

    try:
        edge_version = version("qdrant-edge-py")
    except PackageNotFoundError:
        edge_version = "unknown"
    report = {"benchmark": "bench_index", "date": date.today().isoformat(), "machine": platform.node(),
              "cpu": platform.processor() or platform.machine(), "qdrant_edge_py": edge_version,
              "sizes": results}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{date.today().isoformat()}_cpu_index.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
