"""Is incremental fusion worth it? Full recompute vs reuse of the previous fused rows, after a 1% change.

Both read every row (the full run: each model's dense rows; the incremental one: the previous fused
rows plus the dense rows of changed chunks) and both write the whole fused file, so the question is
whether fusing a row costs more than copying it. Builds two 384-d dense files (the default ensemble's
shape) and a previous fused file for N synthetic chunks, changes 1% of the hashes, then times:

  full         rag_clean.stages.fusion.fusion_stage without a previous file: every row fused
  incremental  the same with previous=: rows matched by hash (rag_clean.storage.reuse), unchanged rows copied,
               the changed 1% fused (what the asset runs)

    python benchmarks/bench_fusion_reuse.py --rows 100000 1000000 [--out benchmarks/results/...json]

Prints seconds per mode and writes JSON. Files go to a temp folder (--dir), removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa

from rag_clean.config.plan import build_run_plan
from rag_clean.config.registry import ModelSpec, Registry
from rag_clean.config.settings import EmbedderSettings
from rag_clean.stages import ROW_BLOCK
from rag_clean.stages.context import StageContext, StageIO
from rag_clean.stages.fusion import fusion_stage
from rag_clean.storage.layout import StorageLayout
from rag_clean.storage.embeddings import EmbeddingWriter, read_embeddings

DIMS = (384, 384)
WEIGHTS = (0.8, 0.2)


def _hashes(n: int, changed: np.ndarray | None = None) -> pa.Array:
    keys = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    if changed is not None:
        keys[changed] ^= np.uint64(0xFFFF)
    return pa.array([f"{k:016x}" + "0" * 48 for k in keys.tolist()], pa.string())


def _write(path: Path, ids: pa.Array, hashes: pa.Array, dim: int, seed: int, meta: dict) -> None:
    rng = np.random.default_rng(seed)
    writer = EmbeddingWriter(path, ids, hashes, dim, meta)
    for start in range(0, len(ids), ROW_BLOCK):
        stop = min(start + ROW_BLOCK, len(ids))
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        writer.write(np.arange(start, stop), block)
    writer.finish()
    writer.publish()


def _rewrite_hashes(path: Path, stored, hashes: pa.Array) -> None:
    """The same vectors and metadata under other content hashes (as if those chunks had changed)."""
    tmp = path.with_name("prev_rewritten.arrow")
    writer = EmbeddingWriter(tmp, stored.ids, hashes, stored.dim, stored.metadata)
    for start in range(0, len(stored), ROW_BLOCK):
        stop = min(start + ROW_BLOCK, len(stored))
        writer.write(np.arange(start, stop), np.asarray(stored.vectors[start:stop]))
    writer.finish()
    writer.publish()
    tmp.replace(path)


def bench(rows: int, folder: Path) -> dict:
    ids = pa.array([f"c{i}" for i in range(rows)], pa.string())
    old_hashes = _hashes(rows)
    changed = np.arange(0, rows, 100)  # 1% of the chunks
    new_hashes = _hashes(rows, changed)
    for i, dim in enumerate(DIMS):
        _write(folder / f"m{i}.arrow", ids, new_hashes, dim, i, {"model": f"m{i}"})
    chunks = pa.table({"chunk_id": ids, "content_hash": new_hashes})
    sets = {f"m{i}": read_embeddings(folder / f"m{i}.arrow") for i in range(len(DIMS))}
    weights = dict(zip(sets, WEIGHTS))
    specs = tuple(ModelSpec(name=n, role="dense", source="path:/unused", weight=w) for n, w in weights.items())
    ctx = StageContext("bench", build_run_plan(Registry(models=specs), EmbedderSettings(enable_sparse=False)),
                       StorageLayout(folder / "store"))
    by_asset = {s.asset_name: sets[s.name] for s in specs}

    def run_fusion_stage(path, previous=None):
        return fusion_stage(ctx, StageIO(path, previous), chunks, by_asset)
    # The previous fused file: the current one with 1% of the hashes different (those chunks changed).
    writer, _ = run_fusion_stage(folder / "prev_fused.arrow")
    writer.publish()
    stored = read_embeddings(folder / "prev_fused.arrow")
    _rewrite_hashes(folder / "prev_fused.arrow", stored, old_hashes)
    previous = folder / "prev_fused.arrow"

    t0 = time.perf_counter()
    writer, _ = run_fusion_stage(folder / "fused.arrow")
    full_s = time.perf_counter() - t0
    writer.abort()
    t0 = time.perf_counter()
    writer, record = run_fusion_stage(folder / "fused_inc.arrow", previous)
    inc_s = time.perf_counter() - t0
    writer.abort()
    computed = record.reuse_counts["fused"].computed
    return {"rows": rows, "changed_rows": int(len(changed)), "incremental_computed": computed,
            "full_s": round(full_s, 3), "incremental_s": round(inc_s, 3),
            "incremental_over_full": round(inc_s / full_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<date>_cpu_fusion_reuse.json)")
    args = ap.parse_args()
    results = []
    for rows in args.rows:
        folder = Path(tempfile.mkdtemp(prefix="fusion_reuse_", dir=args.dir))
        try:
            r = bench(rows, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"{rows:>9,} rows: full {r['full_s']:.2f} s, incremental (1% changed) {r['incremental_s']:.2f} s "
              f"({r['incremental_over_full']:.2f}x)", flush=True)
        results.append(r)
    out = Path(args.out or Path(__file__).parent / "results" / f"{date.today()}_cpu_fusion_reuse.json")
    out.write_text(json.dumps({"benchmark": "bench_fusion_reuse", "date": str(date.today()),
                               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                               "dims": list(DIMS), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
