"""Candidate retrieval at collection scale: flat memory and where it runs (issue 9 item 4, issue 13 item 1).

Builds a synthetic collection per size (a fused matrix as the Arrow IPC file the fused asset writes, the
sparse rows as the Parquet file the sparse asset writes, a chunks Parquet), then runs what the reranked
stage runs between encoding the queries and the cross-encoder: blockwise dense top-k over the memory-mapped
matrix (numpy, or torch on a GPU), blockwise sparse top-k over the Parquet row groups, the hybrid pools,
and the lookup of the candidates' ids and texts. Each size runs in its own process, so peak memory is per
size.

Memory: peak anonymous RSS (RssAnon of /proc/self/status, sampled every 20 ms), i.e. without the
memory-mapped file pages, which the kernel drops under pressure; peak RSS (ru_maxrss) is reported too.

    python benchmarks/bench_retrieval.py [--rows 100000,1000000] [--dim 768] [--queries 500] [--device cpu|cuda]
                                         [--out benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


class AnonPeak:
    """Samples RssAnon (bytes) in a thread; `.peak` is the largest seen."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def build(folder: Path, rows: int, dim: int, terms: int, vocab: int, seed: int = 0) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rag_clean.storage.arrow_io import write_arrow_table
    from rag_clean.storage.embeddings import EmbeddingWriter

    rng = np.random.default_rng(seed)
    block = 65536
    ids = pa.array([f"c{i:08d}" for i in range(rows)])
    hashes = pa.array([f"{i:064x}" for i in range(rows)])
    writer = EmbeddingWriter(folder / "fused.arrow", ids, hashes, dim)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        writer.write(np.arange(start, start + n), v)
    writer.finish()
    writer.publish()
    texts = pa.array([f"chunk {i} about the gpu driver and the index" for i in range(rows)])
    # As the chunks asset stores it: one-batch Arrow IPC, read memory-mapped.
    write_arrow_table(pa.table({"chunk_id": ids, "content_hash": hashes, "text": texts,
                                "heading": pa.array([None] * rows, pa.string())}), folder / "chunks.arrow")
    sparse_schema = pa.schema([("chunk_id", pa.string()), ("model", pa.string()), ("term_ids", pa.list_(pa.int32())),
                               ("weights", pa.list_(pa.float32())), ("fallback", pa.bool_())])
    with pq.ParquetWriter(folder / "sparse.parquet", sparse_schema, compression="zstd") as w:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            offsets = pa.array(np.arange(0, (n + 1) * terms, terms, dtype=np.int32))
            t = rng.integers(0, vocab, size=n * terms, dtype=np.int32)
            wts = np.sort(rng.random(n * terms, dtype=np.float32).reshape(n, terms), axis=1)[:, ::-1].reshape(-1)
            w.write_table(pa.table({"chunk_id": ids.slice(start, n), "model": pa.array(["splade"] * n),
                                    "term_ids": pa.ListArray.from_arrays(offsets, pa.array(t)),
                                    "weights": pa.ListArray.from_arrays(offsets, pa.array(wts.copy())),
                                    "fallback": pa.array(np.zeros(n, bool))}, schema=sparse_schema))
    return {"fused_bytes": (folder / "fused.arrow").stat().st_size,
            "sparse_bytes": (folder / "sparse.parquet").stat().st_size}


def run_one(folder: Path, queries: int, k: int, device: str, vocab: int) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from rag_clean.retrieval.candidates import DenseScorer, SparseScorer, build_pools
    from rag_clean.retrieval.flat import take_column
    from rag_clean.retrieval.sparse_scan import sparse_scan_device
    from rag_clean.stages.query_side import sparse_blocks as _sparse_blocks
    from rag_clean.storage.arrow_io import read_arrow_table
    from rag_clean.storage.embeddings import read_embeddings

    rng = np.random.default_rng(1)
    out: dict = {}
    with AnonPeak() as peak:
        t0 = time.perf_counter()
        chunks = read_arrow_table(folder / "chunks.arrow")
        fused = read_embeddings(folder / "fused.arrow")
        out["open_s"] = round(time.perf_counter() - t0, 3)
        # What opening the inputs holds (decoded chunks columns, EmbeddingSet id lists): the storage layer's,
        # not retrieval's; the peak minus this is what retrieval itself adds.
        out["anon_after_open_mb"] = round(AnonPeak.now() / 2**20, 1)
        q = rng.standard_normal((queries, fused.dim), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        t0 = time.perf_counter()
        dense = DenseScorer(fused.vectors, q, device=device)
        dense_idx, _ = dense.top_k(k)
        out["dense_topk_s"] = round(time.perf_counter() - t0, 3)
        q_rows = [(np.sort(rng.choice(vocab, 24, replace=False)).astype(np.int64), rng.random(24).astype(np.float32))
                  for _ in range(queries)]
        t0 = time.perf_counter()
        sparse = SparseScorer(_sparse_blocks(folder / "sparse.parquet", "splade", chunks), chunks.num_rows, q_rows,
                              device=sparse_scan_device(device))
        pools, sparse_tops = build_pools(dense_idx, dense.scores, [sparse], k, "minmax")
        out["sparse_and_pools_s"] = round(time.perf_counter() - t0, 3)
        out["dense_resident"] = dense.resident is not None
        # Same digest on every device = the same candidates (random float weights: a near-tie may still round apart).
        out["sparse_top_sha256"] = hashlib.sha256(np.concatenate(sparse_tops[0]).astype(np.int64).tobytes()).hexdigest()
        out["dense_top_sha256"] = hashlib.sha256(np.asarray(dense_idx, np.int64).tobytes()).hexdigest()
        t0 = time.perf_counter()
        top = np.unique(np.concatenate([p.ranking((0.3, 0.7), 20)[0] for p in pools]))
        ids, texts = take_column(chunks, "chunk_id", top), take_column(chunks, "text", top)
        out["candidate_lookup_s"] = round(time.perf_counter() - t0, 3)
        assert len(ids) == len(texts) == len(top)
    out["peak_anon_rss_mb"] = round(peak.peak / 2**20, 1)
    out["retrieval_anon_mb"] = round(out["peak_anon_rss_mb"] - out["anon_after_open_mb"], 1)
    out["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--terms", type=int, default=64, help="sparse terms per chunk")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--device", default="cpu", help="comma list: each runs on the same built collection")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.queries, args.k, args.device, args.vocab)))
        return 0
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            sizes = build(Path(tmp), rows, args.dim, args.terms, args.vocab)
            build_s = round(time.perf_counter() - t0, 1)
            for device in args.device.split(","):
                proc = subprocess.run([sys.executable, __file__, "--child", tmp, "--queries", str(args.queries),
                                       "--k", str(args.k), "--device", device, "--vocab", str(args.vocab)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"child failed on {device}: {proc.stderr.strip()[-2000:]}")
                row = {"rows": rows, "device": device, "build_s": build_s, **sizes,
                       **json.loads(proc.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                results.append(row)
    summary = {"benchmark": "bench_retrieval", "devices": args.device, "dim": args.dim, "queries": args.queries,
               "k": args.k, "sparse_terms": args.terms, "machine": platform.node(), "cpus": __import__("os").cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "results": results}
    for device in args.device.split(","):
        mine = [r for r in results if r["device"] == device]
        if len(mine) > 1:
            summary[f"{device}: peak_anon_rss_ratio_largest_vs_smallest"] = round(
                mine[-1]["peak_anon_rss_mb"] / mine[0]["peak_anon_rss_mb"], 3)
            summary[f"{device}: retrieval_anon_ratio_largest_vs_smallest"] = round(
                mine[-1]["retrieval_anon_mb"] / mine[0]["retrieval_anon_mb"], 3)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
