"""Flat memory at scale (issue 9 item 4): every asset of a 100k- and a 1M-chunk collection through the real
asset graph, peak anonymous RSS per step at each size and their ratio (target: 1M <= 1.10 x 100k).

    python benchmarks/bench_scale.py [--sizes 100000,1000000] [--words 30] [--select '*'] [--rows-per-file 200] [--out results.json]

Each size: a fresh DAGSTER_HOME and storage root in a temp folder, a synthetic collection (JSONL + Markdown,
~40 tokens per chunk, see scale_common.py), tiny random models (2 dense, SPLADE, cross-encoder), 200 fixed
queries, then `dagster asset materialize --select '*'` with RAG_CLEAN_EXECUTOR=multiprocess, so every step
(asset or check) is its own process. Memory is measured two ways:
- `poll`: this script reads RssAnon of every step process from /proc every 50 ms (checks included);
- `probe`: the step's own `peak_rss_anon_bytes` from the processing summary (rag_clean/telemetry/memory.py).
RssAnon excludes memory-mapped file pages (the chunks and embedding files), which is the issue's measure.
Wall time per step is how long its process was seen. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--words" in sys.argv:  # before scale_common reads it
    os.environ["RAG_CLEAN_BENCH_WORDS"] = sys.argv[sys.argv.index("--words") + 1]
import scale_common as sc  # noqa: E402

TARGET = 1.10


def run_size(n: int, rows_per_file: int, keep: bool, select: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"rag_clean_scale_{n}_"))
    try:
        t0 = time.perf_counter()
        registry = sc.tiny_registry(tmp)
        sc.make_collection(tmp / "data" / "scale", n, rows_per_file=rows_per_file)
        generate_s = time.perf_counter() - t0
        env = sc.setup_instance(tmp, registry, ["scale"])
        run = sc.materialize_all(env, tmp, "scale", tmp / "materialize.log", select)
        records = sc.stage_records(tmp / "storage", "scale")
        rows = records.get("chunks", {}).get("rows")
        print(f"  {n:,} chunks requested, {rows:,} stored; generate {generate_s:.1f} s, materialize {run['wall_s']:.1f} s",
              flush=True)
        steps = {}
        for step, polled in run["steps"].items():
            steps[step] = {"poll_peak_rss_anon_bytes": polled["peak_rss_anon_bytes"], "wall_s": polled["wall_s"]}
        for key, rec in records.items():
            step = key.replace("/", "__")
            entry = steps.setdefault(step, {})
            entry.update(probe_peak_rss_anon_bytes=rec.get("peak_rss_anon_bytes"), stage_duration_s=rec.get("duration_s"))
        return {"chunks": rows, "generate_s": round(generate_s, 1), "wall_s": run["wall_s"], "steps": steps,
                "storage": str(tmp) if keep else None}
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--rows-per-file", type=int, default=200)
    ap.add_argument("--select", default="*", help="asset selection (default every asset; e.g. 'chunks' with its checks)")
    ap.add_argument("--words", type=int, default=30, help="words per chunk (30 ~ 42 tokens, 12 ~ 20)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folders")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    out = args.out or sc.REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}_cpu_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"benchmark": "scale", "machine": sc.machine(), "command": " ".join(sys.argv), "sizes": sizes,
              "words_per_chunk": sc.WORDS_PER_CHUNK, "select": args.select, "target_ratio": TARGET}
    for n in sizes:
        print(f"size {n:,}", flush=True)
        results[n] = run_size(n, args.rows_per_file, args.keep, args.select)
        # Written after each size, so a run stopped during the large one keeps the small one's figures.
        out.write_text(json.dumps({**header, "date": dt.datetime.utcnow().isoformat() + "Z", "complete": False,
                                   "runs": {str(k): v for k, v in results.items()}}, indent=2) + "\n")
    small, large = sizes[0], sizes[-1]
    table = []
    mib = 2 ** 20
    print(f"\n{'step':<44} {'peak anon MiB @' + str(small):>18} {'@' + str(large):>10} {'ratio':>6} "
          f"{'wall s @' + str(small):>12} {'@' + str(large):>8}")
    for step in sorted(set(results[small]["steps"]) | set(results[large]["steps"])):
        a, b = results[small]["steps"].get(step, {}), results[large]["steps"].get(step, {})
        pa_, pb = a.get("poll_peak_rss_anon_bytes"), b.get("poll_peak_rss_anon_bytes")
        ratio = round(pb / pa_, 3) if pa_ and pb else None
        row = {"step": step, f"peak_{small}": pa_, f"peak_{large}": pb, "ratio": ratio,
               f"probe_{small}": a.get("probe_peak_rss_anon_bytes"), f"probe_{large}": b.get("probe_peak_rss_anon_bytes"),
               f"wall_s_{small}": a.get("wall_s"), f"wall_s_{large}": b.get("wall_s"),
               "meets_target": ratio is not None and ratio <= TARGET}
        table.append(row)
        fmt = lambda v: f"{v / mib:.0f}" if v else "-"  # noqa: E731
        print(f"{step:<44} {fmt(pa_):>18} {fmt(pb):>10} {ratio if ratio else '-':>6} "
              f"{a.get('wall_s', '-'):>12} {b.get('wall_s', '-'):>8}")
    print(f"\nwhole graph: {results[small]['wall_s']} s @ {small:,}, {results[large]['wall_s']} s @ {large:,}")
    misses = [r["step"] for r in table if r["ratio"] is not None and not r["meets_target"]]
    print("steps over the 1.10 target: " + (", ".join(misses) if misses else "none"))
    out.write_text(json.dumps({**header, "date": dt.datetime.utcnow().isoformat() + "Z", "complete": True,
                               "table": table, "runs": {str(k): v for k, v in results.items()}}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
