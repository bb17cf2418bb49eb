"""HNSW build levers of the embedded Qdrant Edge sink (issue 23: `vector_index` is part of the whole graph).

One shard per variant, same points (clustered unit vectors like bench_index.py's, fused shape 1152-d = MiniLM
384 + bge-base 768), timed in two phases: upsert (Python -> Edge, the points' conversion included) and build
(flush + optimize: Edge builds the HNSW graph there, on all cores). Recall@10 of the graph (hnsw_ef =
SEARCH_HNSW_EF) against exact search on 50 noisy stored vectors says what a lever costs in quality.

Variants (comma list): base (what rag_clean.index ships: m=16, ef_construct=100), ef64 (ef_construct 64),
f16 (vectors stored as float16), sq8 (int8 scalar quantization, kept in RAM), seg4 / seg8 (that many
segments: smaller graphs built side by side), threads1 (max_indexing_threads=1: how much the build scales).

    python benchmarks/bench_index_build.py --n 100000 --variants base,ef64,f16,seg4 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from rag_clean.index.base import HNSW_EF_CONSTRUCT, HNSW_FULL_SCAN_KB, HNSW_M, SEARCH_HNSW_EF  # noqa: E402

BLOCK = 4096


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def points(n: int, dim: int, seed: int = 0, data: str = "clustered") -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: "clustered" (topic centre + noise of the same norm, like bench_index.py's) or "iid" (HNSW's
    worst case: no neighbourhood structure)."""
    rng = np.random.default_rng(seed)
    if data == "iid":
        x = unit(rng.standard_normal((n, dim), dtype=np.float32))
    else:
        centres = unit(rng.standard_normal((max(16, n // 100), dim), dtype=np.float32))
        x = unit(centres[rng.integers(0, len(centres), n)] + unit(rng.standard_normal((n, dim), dtype=np.float32)))
    queries = unit(x[rng.integers(0, n, 50)] + 0.3 * unit(rng.standard_normal((50, dim), dtype=np.float32)))
    return x, queries


def config(qe, variant: str, dim: int):
    hnsw = qe.HnswIndexConfig(m=HNSW_M, ef_construct=64 if variant == "ef64" else HNSW_EF_CONSTRUCT,
                              full_scan_threshold=HNSW_FULL_SCAN_KB,
                              max_indexing_threads=1 if variant == "threads1" else 0)
    extra, shard_extra = {}, {}
    if variant == "f16":
        extra["datatype"] = qe.VectorStorageDatatype.Float16
    if variant == "sq8":
        extra["quantization_config"] = qe.ScalarQuantizationConfig(qe.ScalarType.Int8, always_ram=True)
    if variant.startswith("seg"):
        shard_extra["optimizers"] = qe.EdgeOptimizersConfig(default_segment_number=int(variant[3:]))
    return qe.EdgeConfig(vectors={"fused": qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine,
                                                               hnsw_config=hnsw, **extra)}, **shard_extra)


def run_variant(qe, variant: str, x: np.ndarray, queries: np.ndarray, work: Path) -> dict:
    path = work / variant
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shard = qe.EdgeShard.create(str(path), config(qe, variant, x.shape[1]))
    t0 = time.perf_counter()
    for start in range(0, len(x), BLOCK):
        block = x[start:start + BLOCK].tolist()
        shard.update(qe.UpdateOperation.upsert_points(
            [qe.Point(str(uuid.UUID(int=start + i + 1)), {"fused": v}, {"row": start + i}) for i, v in enumerate(block)]))
    t1 = time.perf_counter()
    shard.flush()
    shard.optimize()
    t2 = time.perf_counter()
    recall, latency = [], []
    for q in queries.tolist():
        exact = {p.id for p in shard.query(qe.QueryRequest(limit=10, query=qe.Query.Nearest(q, using="fused"),
                                                           params=qe.SearchParams(exact=True)))}
        s = time.perf_counter()
        approx = {p.id for p in shard.query(qe.QueryRequest(limit=10, query=qe.Query.Nearest(q, using="fused"),
                                                            params=qe.SearchParams(exact=False, hnsw_ef=SEARCH_HNSW_EF)))}
        latency.append(time.perf_counter() - s)
        recall.append(len(exact & approx) / 10)
    shard.close()
    shutil.rmtree(path, ignore_errors=True)
    return {"variant": variant, "upsert_s": round(t1 - t0, 2), "build_s": round(t2 - t1, 2),
            "recall_at_10": round(float(np.mean(recall)), 4), "hnsw_p50_ms": round(1000 * float(np.median(latency)), 3),
            "load_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--variants", default="base,ef64,f16,seg4,threads1")
    ap.add_argument("--data", choices=["clustered", "iid"], default="clustered")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    import qdrant_edge as qe

    x, queries = points(args.n, args.dim, data=args.data)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_index_build_") as work:
        for variant in args.variants.split(","):
            row = run_variant(qe, variant, x, queries, Path(work))
            results.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in results if r["variant"] == "base"), None)
    if base:
        for r in results:
            r["build_vs_base"] = round(r["build_s"] / base["build_s"], 3) if base["build_s"] else None
    out = {"benchmark": "index_build", "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "n": args.n, "dim": args.dim, "data": args.data, "qdrant_edge": getattr(qe, "__version__", "0.9.0"),
           "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
