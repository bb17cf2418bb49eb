"""Exports: a full export vs an export after 1% of the chunks changed (issue 9: reuse in every stage).

Synthetic stored assets (chunks, two dense matrices, fused, one sparse model) of N chunks; a full export,
then 1% of the chunks get new text and vectors and the export runs again with the line index (unchanged
qdrant/sparse lines copied), and once more into a fresh folder without it (the full recompute). Prints
wall times, the reuse counts, and whether every file of the incremental export equals the full one
(sha256).

    python benchmarks/bench_exports.py [--rows 20000] [--dims 384,384] [--changed 0.01] [--out x.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def _stored(folder: Path, rows: int, dims: list[int], changed: set[int], seed: int):
    import numpy as np
    import pyarrow as pa

    from rag_clean.chunking import CHUNK_SCHEMA
    from rag_clean.retrieval.fusion import fuse_block
    from rag_clean.stages.sparse import SPARSE_SCHEMA
    from rag_clean.storage.embeddings import read_embeddings, write_embeddings

    texts = [f"chunk {i} about the gpu driver and the index" + (" (edited)" if i in changed else "")
             for i in range(rows)]
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    ids = [f"docs-{i}" for i in range(rows)]
    chunks = pa.table({"chunk_id": ids, "text": texts, "content_hash": hashes,
                       "source_file": [f"f{i // 50}.md" for i in range(rows)],
                       "chunk_index": pa.array([i % 50 for i in range(rows)], pa.int32()),
                       "heading": [f"Part {i % 50}" for i in range(rows)],
                       "section_path": [["Guide", f"Part {i % 50}"] for i in range(rows)],
                       "token_count": pa.array([12] * rows, pa.int32()), "metadata_json": ["{}"] * rows},
                      schema=CHUNK_SCHEMA)
    dense = {}
    for m, dim in enumerate(dims):
        rng = np.random.default_rng(m)
        vecs = rng.standard_normal((rows, dim), dtype=np.float32)
        for i in sorted(changed):  # changed chunks: other vectors
            vecs[i] = np.random.default_rng(1000 + i + m).standard_normal(dim)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        dense[f"model-{m}"] = read_embeddings(write_embeddings(folder / f"m{m}_{seed}.arrow", ids, hashes, vecs))
    fused = read_embeddings(write_embeddings(folder / f"fused_{seed}.arrow", ids, hashes,
                                             fuse_block([d.vectors for d in dense.values()], [0.5] * len(dims),
                                                        "concat")))
    rng = np.random.default_rng(7)
    terms = np.sort(rng.integers(0, 30522, size=(rows, 64)), axis=1).astype(np.int32)
    weights = np.sort(rng.random((rows, 64), dtype=np.float32), axis=1)[:, ::-1].copy()
    for i in changed:
        weights[i] *= 2
    offsets = pa.array(np.arange(0, (rows + 1) * 64, 64, dtype=np.int32))
    sparse = pa.table({"chunk_id": ids, "model": ["splade"] * rows,
                       "term_ids": pa.ListArray.from_arrays(offsets, pa.array(terms.reshape(-1))),
                       "weights": pa.ListArray.from_arrays(offsets, pa.array(weights.reshape(-1))),
                       "fallback": [False] * rows}, schema=SPARSE_SCHEMA)
    return chunks, dense, fused, sparse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dims", default="384,384")
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import numpy as np

    from rag_clean.exports.write import write_exports
    from rag_clean.storage.layout import StorageLayout

    dims = [int(d) for d in args.dims.split(",")]
    changed = set(np.random.default_rng(3).choice(args.rows, int(args.rows * args.changed), replace=False).tolist())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        layout = StorageLayout(tmp / "storage")
        index = lambda kind: layout.export_line_index("docs", kind)  # noqa: E731
        before = _stored(tmp, args.rows, dims, set(), 0)
        after = _stored(tmp, args.rows, dims, changed, 1)
        kw = dict(sparse_models=["splade"])
        t0 = time.perf_counter()
        write_exports(tmp / "inc", "docs", *before[:3], sparse=before[3], line_index=index, **kw)
        full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        inc, record = write_exports(tmp / "inc", "docs", *after[:3], sparse=after[3], line_index=index, **kw)
        inc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fresh, _ = write_exports(tmp / "fresh", "docs", *after[:3], sparse=after[3], **kw)
        fresh_s = time.perf_counter() - t0
        result = {"benchmark": "bench_exports", "rows": args.rows, "dims": dims, "changed_rows": len(changed),
                  "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                  "full_export_s": round(full_s, 2), "incremental_export_s": round(inc_s, 2),
                  "full_recompute_s": round(fresh_s, 2), "incremental_vs_full": round(inc_s / fresh_s, 3),
                  "reuse": {k: c.to_dict() for k, c in record.reuse_counts.items()},
                  "identical_to_full": inc.to_pylist() == fresh.to_pylist(),
                  "bytes": int(sum(r["bytes"] for r in inc.to_pylist()))}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
