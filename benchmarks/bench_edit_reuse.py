"""One paragraph edited: what the encode stages redo, with the real default models, through the asset graph.

Copies a collection (default: the bundled `sample`) to a temp data root, materializes chunks, every
dense model, fused_embeddings and sparse_vectors in process (dagster.materialize, the real assets and
registry), appends one paragraph to one Markdown file, materializes again, and prints each stage's wall
time and reused/computed rows for both runs (from processing_summary.json). Writes JSON.

    python benchmarks/bench_edit_reuse.py [--collection sample] [--out benchmarks/results/...json]
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
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STAGES = ("chunks", "dense_embeddings/all_minilm_l6_v2", "dense_embeddings/sre_embedding_model",
          "fused_embeddings", "sparse_vectors")


def _run(pipeline, selection) -> tuple[float, dict]:
    t0 = time.perf_counter()
    assert pipeline.materialize(selection=selection).success
    wall = time.perf_counter() - t0
    stages = pipeline.summary()["stages"]
    out = {}
    for key in STAGES:
        st = stages.get(key, {})
        out[key] = {"duration_s": st.get("duration_s"), "reuse_counts": st.get("reuse_counts")}
    return round(wall, 2), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", default="sample")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import dagster as dg

    from pipeline_helpers import Pipeline

    tmp = Path(tempfile.mkdtemp(prefix="edit_reuse_"))
    try:
        data = tmp / "data"
        shutil.copytree(ROOT / "data" / "collections" / args.collection, data / "demo")
        os.environ["EMBEDDER_CONFIG_FILE"] = str(tmp / "absent.json")
        pipeline = Pipeline(data, tmp / "storage", ROOT / "rag_clean" / "models.toml", tmp / "locks")
        selection = dg.AssetSelection.assets("chunks", "fused_embeddings", "sparse_vectors",
                                             *[a.key for a in pipeline.assets if a.key.path[0] == "dense_embeddings"])
        full_wall, full = _run(pipeline, selection)
        doc = sorted((data / "demo").glob("*.md"))[0]
        doc.write_text(doc.read_text(encoding="utf-8") + "\n\nOne more paragraph, appended to measure reuse.\n",
                       encoding="utf-8")
        edit_wall, edit = _run(pipeline, selection)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, wall, stages in (("full", full_wall, full), ("after one edit", edit_wall, edit)):
        print(f"{name}: {wall:.1f} s")
        for key, st in stages.items():
            print(f"  {key:40s} {st['duration_s'] or 0:7.2f} s  {json.dumps(st['reuse_counts'])}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{date.today()}_cpu_edit_reuse_{args.collection}.json")
    out.write_text(json.dumps({"benchmark": "bench_edit_reuse", "date": str(date.today()),
                               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "collection": args.collection,
                               "edited_file": doc.name, "full": {"wall_s": full_wall, "stages": full},
                               "after_edit": {"wall_s": edit_wall, "stages": edit}}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
