"""The chunks stage's JSONL read: in-process against worker processes (chunking.jsonl_pool), same run.

Builds bench_e2e_gpu's synthetic collection (N rows of JSONL, ~1.2 KB each: 100k rows = 114 MiB), then
streams it into a chunks file the way the stage does (chunking.collection.stream_collection, token counts by
the bert-base-uncased tokenizer of the e2e registry's models), once per plan per repetition, interleaved,
and reports the median wall time, the parent's and the workers' CPU seconds, and whether every table
equals the in-process one.

  python benchmarks/bench_chunks.py --chunks 100000 --reps 3 --out benchmarks/results/chunks.json
  --workers 0,auto,2    plans to time (0 = in-process, auto = one per usable core)
  --counter estimate    the tokenizer-free estimate instead of the real tokenizer
  --baseline-tree DIR   also time the code in DIR (e.g. `git archive main rag_clean | tar -x -C DIR`) as
                        "before", in a child process, interleaved with the others
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from rag_clean.chunking.collection import stream_collection  # noqa: E402
from rag_clean.chunking.jsonl_pool import JsonlPlan  # noqa: E402
from rag_clean.chunking.rows import CHUNK_SCHEMA  # noqa: E402
from rag_clean.chunking.tokens import approx_token_count  # noqa: E402
from rag_clean.processes import usable_cores  # noqa: E402
from rag_clean.storage.arrow_io import ColumnSpool, read_arrow_table  # noqa: E402


def cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def run_once(folder: Path, scratch: Path, count, workers: int | None) -> tuple[dict, Path]:
    spool = ColumnSpool(scratch / f"chunks_{workers}.arrow", CHUNK_SCHEMA)
    (p0, c0), t0 = cpu(), time.perf_counter()
    result = stream_collection(folder, spool, count_tokens=count, jsonl=JsonlPlan(workers=workers))
    path = spool.publish()
    wall = time.perf_counter() - t0
    p1, c1 = cpu()
    return {"seconds": wall, "parent_cpu_s": p1 - p0, "workers_cpu_s": c1 - c0, "rows": result.rows}, path


# "before": another checkout's stream_collection in a child process (its own imports), timed inside it.
_BASELINE = """
import json, resource, sys, time
from pathlib import Path
from rag_clean.chunking.collection import stream_collection
from rag_clean.chunking.rows import CHUNK_SCHEMA
from rag_clean.chunking.tokens import approx_token_count
from rag_clean.config.registry import ModelSpec
from rag_clean.encoders.chunk_tokens import load_packing_tokenizer
from rag_clean.storage.arrow_io import ColumnSpool
folder, out, counter, tokenizer_dir = sys.argv[1:5]
count = (load_packing_tokenizer(ModelSpec(name="minilm-l6", role="dense", source="bench"), tokenizer_dir).counter()
         if counter == "tokenizer" else approx_token_count)
spool = ColumnSpool(Path(out), CHUNK_SCHEMA)
c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
result = stream_collection(Path(folder), spool, count_tokens=count)
spool.publish()
wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": wall, "parent_cpu_s": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                  "workers_cpu_s": 0.0, "rows": result.rows}))
"""


def run_baseline(tree: Path, folder: Path, scratch: Path, counter: str, tokenizer_dir: Path) -> tuple[dict, Path]:
    import subprocess

    out = scratch / "chunks_before.arrow"
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", _BASELINE, str(folder), str(out), counter, str(tokenizer_dir)],
                          env=env, cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), out


def _name(label: str) -> str:
    return label if label == "before" else f"workers {label}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", default="0,auto")
    p.add_argument("--counter", choices=["tokenizer", "estimate"], default="tokenizer")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-tree", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import bench_e2e_gpu as e2e  # its collection builder: the same rows the whole-graph benchmark reads
    import bench_encode as be
    from rag_clean.config.registry import ModelSpec
    from rag_clean.encoders.chunk_tokens import load_packing_tokenizer

    tokenizer_dir = be.find_tokenizer_dir()
    folder = args.work / "data" / "synth"
    built = e2e.build_collection(folder, tokenizer_dir, args.chunks, 200, args.seed)
    (folder / "queries.jsonl").unlink()  # not a document (the stage excludes it by name); only the rows count
    count = (load_packing_tokenizer(ModelSpec(name="minilm-l6", role="dense", source="bench"), tokenizer_dir).counter()
             if args.counter == "tokenizer" else approx_token_count)
    plans: list = ["before"] if args.baseline_tree else []
    plans += [None if w == "auto" else int(w) for w in args.workers.split(",")]
    runs: dict[str, list[dict]] = {str(w if w is not None else "auto"): [] for w in plans}
    reference = None
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        for rep in range(args.reps):
            for w in plans:
                label = str(w if w is not None else "auto")
                run, path = (run_baseline(args.baseline_tree.resolve(), folder, Path(scratch), args.counter, tokenizer_dir)
                             if w == "before" else run_once(folder, Path(scratch), count, w))
                table = read_arrow_table(path)
                reference = table if reference is None else reference
                run["equal_to_first"] = bool(table.equals(reference))
                del table
                path.unlink()
                runs[label].append(run)
                print(f"rep {rep} {_name(label)}: {run['seconds']:.2f} s (parent cpu {run['parent_cpu_s']:.1f} s, "
                      f"workers cpu {run['workers_cpu_s']:.1f} s) equal {run['equal_to_first']}", flush=True)
    summary = {label: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "parent_cpu_s", "workers_cpu_s")}
               for label, rs in runs.items()}
    base = summary[next(iter(summary))]["seconds"]
    for label, s in summary.items():
        s["speedup_vs_first"] = base / s["seconds"]
        print(f"{_name(label)}: median {s['seconds']:.2f} s, x{s['speedup_vs_first']:.2f} vs {_name(next(iter(summary)))}")
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    report = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu": model,
              "usable_cores": usable_cores(), "python": platform.python_version(), "chunks": args.chunks,
              "bytes": built["bytes"], "counter": args.counter, "reps": args.reps,
              "command": "python benchmarks/bench_chunks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs, "median": summary,
              "all_equal": all(r["equal_to_first"] for rs in runs.values() for r in rs)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
