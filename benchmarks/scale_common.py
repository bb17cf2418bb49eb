"""Shared by bench_scale.py and bench_reuse.py: synthetic collections, the tiny registry, and one
`dagster asset materialize --select '*'` run with every step process's anonymous RSS polled from outside.

Collections mix JSONL (half the chunks, `rows_per_file` records per file) and Markdown (half: files of
`rows_per_file` short sections, one chunk each). Texts are WORDS_PER_CHUNK words (default 30, ~42 tokens;
`--words`) from the tiny models' vocabulary plus a per-chunk number, so encoding stays cheap on a CPU. Generation is numpy-vectorized
(a pool of random sentences) and written file by file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from rag_clean.telemetry.memory import rss_anon_bytes  # noqa: E402

BIN = Path(sys.executable).parent
WORDS_PER_CHUNK = int(os.environ.get("RAG_CLEAN_BENCH_WORDS", "30"))  # 30 words ~ 42 tokens, 12 ~ 20
BLOCK = 50_000


_POOL: dict[int, list[str]] = {}


def _pool(vocab: np.ndarray, size: int = 1 << 15) -> list[str]:
    """Random 30-word sentences; a chunk is one of them plus its own number (so every text is unique)."""
    if size not in _POOL:
        rng = np.random.default_rng(12345)
        _POOL[size] = [" ".join(row) for row in vocab[rng.integers(0, len(vocab), (size, WORDS_PER_CHUNK))].tolist()]
    return _POOL[size]


def _texts(rng: np.random.Generator, start: int, n: int, vocab: np.ndarray, salt: str = "") -> list[str]:
    pool = _pool(vocab)
    picks = rng.integers(0, len(pool), size=n).tolist()
    return [f"{pool[p]} item {salt}{start + i}" for i, p in enumerate(picks)]


def jsonl_file_text(rng, first: int, n: int, vocab, salt: str = "") -> str:
    texts = _texts(rng, first, n, vocab, salt)
    return "".join(json.dumps({"id": f"j{first + i}", "text": t}) + "\n" for i, t in enumerate(texts))


def markdown_file_text(rng, first: int, n: int, vocab, salt: str = "") -> str:
    texts = _texts(rng, first, n, vocab, salt)
    return f"# Document {first}\n\n" + "".join(f"## Section {first + i}\n\n{t}\n\n" for i, t in enumerate(texts))


def vocabulary() -> np.ndarray:
    from tiny_models import TEST_WORDS

    return np.array(TEST_WORDS)


def make_collection(folder: Path, n_chunks: int, rows_per_file: int = 200, seed: int = 0, queries: int = 200) -> dict:
    """Write ~n_chunks chunks as JSONL + Markdown files under folder; returns the file lists."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    n_jsonl = n_chunks // 2
    files = {"jsonl": [], "markdown": []}
    for kind, total, writer, ext in (("jsonl", n_jsonl, jsonl_file_text, "jsonl"),
                                     ("markdown", n_chunks - n_jsonl, markdown_file_text, "md")):
        sub = folder / kind
        sub.mkdir(exist_ok=True)
        for first in range(0, total, rows_per_file):
            n = min(rows_per_file, total - first)
            path = sub / f"{kind}_{first // rows_per_file:06d}.{ext}"
            path.write_text(writer(rng, first, n, vocab), encoding="utf-8")
            files[kind].append((path, first, n))
    # Fixed evaluation queries (gold = JSONL ids), so retrieval work does not depend on collection size.
    picks = rng.choice(n_jsonl, size=min(queries, n_jsonl), replace=False)
    lines = [json.dumps({"query_id": f"q{k}", "text": " ".join(vocab[rng.integers(0, len(vocab), 8)]),
                         "gold_chunk_ids": [f"j{int(p)}"]}) for k, p in enumerate(picks)]
    (folder / "queries.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def tiny_registry(root: Path) -> Path:
    from tiny_models import build_cross_encoder, build_sentence_transformer, build_splade, write_tiny_registry, TINY_DENSE_DIMS

    models = root / "models"
    for i, (name, dim) in enumerate(TINY_DENSE_DIMS.items()):
        build_sentence_transformer(models / name, seed=i, hidden=dim)
    build_splade(models / "tiny-splade", seed=10)
    build_cross_encoder(models / "tiny-reranker", seed=20)
    return write_tiny_registry(root / "registry", models)


def _rss_anon(pid: int) -> int | None:
    return rss_anon_bytes(pid)


_WORKER_LINE = re.compile(r" - (?P<pid>\d+) - (?P<step>[^ ]+) - STEP_WORKER_STARTED - ")


class StepPoller:
    """Polls every descendant process of the CLI: per pid, peak RssAnon and first/last seen time.
    Dagster's multiprocess executor spawns one process per step; its log names each step's pid."""

    def __init__(self, root_pid: int, interval_s: float = 0.05):
        self.root_pid, self.interval_s = root_pid, interval_s
        self.pids: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                pids = [self.root_pid] + [c.pid for c in psutil.Process(self.root_pid).children(recursive=True)]
            except psutil.Error:
                pids = []
            now = time.perf_counter()
            for pid in pids:
                rss = _rss_anon(pid)
                if rss is None:
                    continue
                entry = self.pids.setdefault(pid, {"peak_rss_anon_bytes": 0, "first": now, "last": now})
                entry["peak_rss_anon_bytes"] = max(entry["peak_rss_anon_bytes"], rss)
                entry["last"] = now
            time.sleep(self.interval_s)

    def steps(self, log_text: str) -> dict[str, dict]:
        out = {}
        for match in _WORKER_LINE.finditer(log_text):
            entry = self.pids.get(int(match["pid"]))
            if entry is not None:
                out[match["step"]] = {"peak_rss_anon_bytes": entry["peak_rss_anon_bytes"],
                                      "wall_s": round(entry["last"] - entry["first"], 2)}
        root = self.pids.get(self.root_pid)
        if root is not None:
            out["(cli orchestrator)"] = {"peak_rss_anon_bytes": root["peak_rss_anon_bytes"],
                                         "wall_s": round(root["last"] - root["first"], 2)}
        return out


def materialize_all(env: dict, cwd: Path, collection: str, log: Path, select: str = "*") -> dict:
    """One `dagster asset materialize --select '*'` for the collection; wall time and per-step polls."""
    cmd = [str(BIN / "dagster"), "asset", "materialize", "--select", select, "--partition", collection,
           "-m", "rag_clean_assets.definitions"]
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        with StepPoller(proc.pid) as poller:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} exited {rc}; log: {log}\n{text[-4000:]}")
    return {"wall_s": round(wall, 2), "steps": poller.steps(text)}


def stage_records(storage: Path, collection: str) -> dict:
    summary = json.loads((storage / "telemetry" / collection / "processing_summary.json").read_text())
    return summary.get("stages", {})


def setup_instance(tmp: Path, registry: Path, collections: list[str], **extra: str) -> dict:
    from project_env import init_instance, project_env

    # One torch thread per step process: on a shared 2-core box, torch's default (one OpenMP thread per
    # core) spins against the other processes and encodes ~5x slower (measured: 10.8k vs 52k tokens/s).
    extra = {"OMP_NUM_THREADS": "1", **extra}
    env = project_env(tmp, registry, tmp / "data", RAG_CLEAN_EXECUTOR="multiprocess", **extra)
    init_instance(env, tmp, collections, timeout=600)
    return env


def machine() -> str:
    import platform

    return f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
