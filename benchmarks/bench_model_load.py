"""A fresh process's "import + load + encode N chunks" for one dense model (issue 23 item 1): the light loader
(transformers alone) against loading through sentence-transformers (RAG_CLEAN_LIGHT_LOAD=0), alternating, each
run a new interpreter; prints JSON and writes it to --out.

  python benchmarks/bench_model_load.py --model all-minilm-l6-v2 --chunks 100 --reps 3 \
      --out benchmarks/results/2026-12-08_cpu_model_load_minilm.json

Per run: wall and CPU seconds of the whole child process (interpreter start to exit, as the parent sees it;
CPU from getrusage, all threads), and inside it `import torch`, the load (with the imports it pulls: transformers, and sentence-transformers on
the old path), the encode, and which of sentence_transformers / sklearn / scipy ended up imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import torch
t1 = time.perf_counter()
from rag_clean.config.registry import load_registry
from rag_clean.encoders.factory import load_dense_encoder
texts = json.load(open(sys.argv[2]))
spec = load_registry().get(sys.argv[1])
t2, c2 = time.perf_counter(), time.process_time()
enc = load_dense_encoder(spec, "cpu")
t3, c3 = time.perf_counter(), time.process_time()
vecs = enc.encode_all(texts)
t4 = time.perf_counter()
print(json.dumps({"import_torch": t1 - t0, "load": t3 - t2, "encode": t4 - t3, "in_process": t4 - t0,
                  "load_cpu": c3 - c2, "in_process_cpu": time.process_time() - c0,
                  "loader": enc.loader, "rows": len(vecs),
                  "imported": sorted(m for m in ("sentence_transformers", "sklearn", "scipy") if m in sys.modules)}))
"""


def sample_texts(n: int) -> list[str]:
    """The first n chunk texts of the sample collection, repeated if it has fewer."""
    from rag_clean.chunking.collection import read_collection

    texts = read_collection(ROOT / "data" / "collections" / "sample").table.column("text").to_pylist()
    return [texts[i % len(texts)] for i in range(n)]


def one_run(model: str, texts_file: str, light: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAG_CLEAN_LIGHT_LOAD": "1" if light else "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    t, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", CHILD, model, texts_file], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    if out.returncode != 0:
        sys.exit(f"child failed: {out.stderr[-2000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {"process_wall": round(wall, 3), "process_cpu": round(process_cpu, 3), **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in child.items()}}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2", help="registry name (default registry)")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, help="JSON file to write (atomically)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = str(Path(tmp) / "texts.json")
        Path(texts_file).write_text(json.dumps(sample_texts(args.chunks)))
        runs: dict[str, list[dict]] = {"sentence-transformers": [], "light": []}
        for _ in range(args.reps):  # alternate, so load on the shared box hits both alike
            runs["sentence-transformers"].append(one_run(args.model, texts_file, light=False))
            runs["light"].append(one_run(args.model, texts_file, light=True))
    keys = ("process_wall", "process_cpu", "in_process", "import_torch", "load", "load_cpu", "encode")
    medians = {name: {k: round(median([r[k] for r in rs]), 3) for k in keys} for name, rs in runs.items()}
    result = {
        "issue": 23, "item": 1, "date": date.today().isoformat(),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
                  f"load average {os.getloadavg()[0]:.1f} at the end",
        "command": "python benchmarks/bench_model_load.py " + " ".join(sys.argv[1:]),
        "model": args.model, "chunks": args.chunks, "reps": args.reps,
        "runs": runs, "median_seconds": medians,
        "speedup_process_wall": round(medians["sentence-transformers"]["process_wall"] / medians["light"]["process_wall"], 2),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
