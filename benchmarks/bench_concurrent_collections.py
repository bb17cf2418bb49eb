"""Load case: N small collections at once versus one alone (tiny models, one DAGSTER_HOME written by
init-home). Target: N=8 within 4x of one.

    python benchmarks/bench_concurrent_collections.py [--mode processes|rag-clean] [--n 8] [--pool-limit 1] [--out x.json]

--mode processes: N `dagster asset materialize` processes started together (what a script or N terminals do;
  each process pays its own Python/torch/Dagster start-up, so on few cores this is bounded by CPU: the JSON
  reports the CPU seconds of one run and the floor N * cpu_one / cores that no scheduling can beat).
--mode rag-clean: one `rag-clean --collections c0,...` process for all N (start-up paid once).

--pool-limit sets RAG_CLEAN_GPU_POOL_LIMIT for init-home (default: what init-home picks on this machine:
one slot per GPU, no limit without CUDA). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
BIN = Path(sys.executable).parent
TEXT = "install the gpu driver then restart the server and query the embedding index {i}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["processes", "rag-clean"], default="processes")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rows", type=int, default=40, help="records per collection")
    ap.add_argument("--pool-limit", type=int, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from project_env import init_instance, project_env
    from tiny_models import build_all, write_tiny_registry

    tmp = Path(tempfile.mkdtemp(prefix="rag_clean_load_"))
    registry = write_tiny_registry(tmp / "registry", build_all(tmp / "models"))
    names = ["solo"] + [f"c{i}" for i in range(args.n)]
    for name in names:
        (tmp / "data" / name).mkdir(parents=True)
        (tmp / "data" / name / "notes.jsonl").write_text(
            "".join(json.dumps({"id": f"{name}-{i}", "text": TEXT.format(i=i)}) + "\n" for i in range(args.rows)))
    env = project_env(tmp, registry, tmp / "data",
                      **({"RAG_CLEAN_GPU_POOL_LIMIT": str(args.pool_limit)} if args.pool_limit is not None else {}))
    init_instance(env, tmp, names, timeout=600)
    config = (tmp / "home" / "dagster.yaml").read_text()
    limit = next((line.split(":")[1].strip() for line in config.splitlines() if "default_limit" in line), "none")

    def commands(collections: list[str]) -> list[list[str]]:
        if args.mode == "rag-clean":
            return [[sys.executable, "-m", "rag_clean_assets.cli", "--chunked-dir", str(tmp / "data"),
                     "--collections", ",".join(collections), "--log-level", "WARNING"]]
        return [[str(BIN / "dagster"), "asset", "materialize", "--select", "*", "--partition", c,
                 "-m", "rag_clean_assets.definitions"] for c in collections]

    def materialize(collections: list[str]) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the processes)"""
        cpu0 = os.times()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for cmd in commands(collections)]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"{proc.args} failed:\n{err.decode()[-3000:]}")
        cpu1 = os.times()
        return time.perf_counter() - t0, (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)

    load_before = os.getloadavg()[0]
    one, cpu_one = materialize(["solo"])
    many, cpu_many = materialize(names[1:])
    result = {
        "benchmark": "concurrent_collections", "mode": args.mode, "collections": args.n, "rows_per_collection": args.rows,
        "gpu_pool_limit": limit, "cores": os.cpu_count(), "load_average_before": round(load_before, 2),
        "one_collection_s": round(one, 1), "n_at_once_s": round(many, 1), "ratio": round(many / one, 2),
        "cpu_s_one": round(cpu_one, 1), "cpu_s_n": round(cpu_many, 1),
        **({"cpu_floor_ratio": round(cpu_many / (os.cpu_count() or 1) / one, 2)} if args.mode == "processes" else {}),
        "target_ratio": 4.0, "ok": many / one <= 4.0,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
