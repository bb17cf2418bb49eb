"""What the collection sensor pays per tick to observe a collection folder (rag_clean.chunking.folder_version):
cold (no digest cache: every file read and hashed), warm (cache hit: stat only), and after editing one file.

    python benchmarks/bench_observe.py [--files 10000] [--kib 4] [--out benchmarks/results/x.json]

Prints and writes JSON (seconds, files per second). The folder is generated in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rag_clean.chunking.folder_version import folder_version  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--kib", type=int, default=4, help="size of each file")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data" / "c"
        for i in range(args.files):
            sub = folder / f"d{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"doc{i:06d}.md").write_text(f"# Doc {i}\n\n" + ("lorem ipsum dolor " * 57)[: args.kib * 1024])
        cache = Path(tmp) / "state" / "c.json"
        figures = {}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            v = folder_version(folder, cache)
            figures[label] = {"seconds": round(time.perf_counter() - t0, 3), "files_hashed": v.hashed}
        (folder / "d000" / "doc000000.md").write_text("# Doc 0\n\nedited\n")
        t0 = time.perf_counter()
        v2 = folder_version(folder, cache)
        figures["one_file_edited"] = {"seconds": round(time.perf_counter() - t0, 3), "files_hashed": v2.hashed,
                                      "version_changed": v2.digest != v.digest}
    result = {"benchmark": "bench_observe", "date": date.today().isoformat(), "machine": platform.node(),
              "cpu_count": __import__("os").cpu_count(), "files": args.files, "kib_per_file": args.kib,
              **figures, "warm_files_per_s": round(args.files / max(figures["warm"]["seconds"], 1e-9))}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
