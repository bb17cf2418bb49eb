"""The whole graph, end to end: `dagster asset materialize --select '*'` on one synthetic collection,
each step's wall time against the encode-only time of the same models on the same tokens (issue 13).

Builds, under --work:
- a collection of N chunks as JSONL (vectorized: sentences drawn from a seeded pool, so 1M chunks take
  seconds, not minutes), plus `queries.jsonl` with 200 queries (gold = the chunk each was drawn from);
- a registry of random-init models of real shapes (throughput does not depend on weight values), all with
  the bert-base-uncased tokenizer: MiniLM-L6 and bge-base dense, SPLADE on bge-base, a bge-base
  cross-encoder (bench_encode.build_models);
then runs the product as a user would (init-home, add the partition, materialize everything), reads each
step's start/end from the run's event log and each stage's record from the summary, and finally times
the same models encode-only (the runner, no Dagster, no files) on the chunks the graph stored.
Prints whole-graph / sum(encode-only) (issue 13's target: <= 1.15) and writes JSON (--out).

  python benchmarks/bench_e2e_gpu.py --chunks 100000 --out benchmarks/results/e2e.json         # GPU
  python benchmarks/bench_e2e_gpu.py --chunks 300 --device cpu --small-models --out /tmp/e2e.json
  --token-cache off,on   runs the graph once per setting (fresh storage each), to measure what
                         tokenizing once per tokenizer saves (RAG_CLEAN_TOKEN_CACHE).
  --phase first / rest   the same graph in two commands on one machine (chunks + dense, then the rest, in
                         one instance and storage): for collections whose graph outlasts one device call.
                         --encode-only-chunks N then times encode-only on N chunks, scaled by tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_encode as be  # noqa: E402

COLLECTION = "synth"
MODELS = [  # (registry name, kind, shape)
    ("minilm-l6", "dense", "minilm-l6"),
    ("bge-base", "dense", "bge-base"),
    ("splade-bge-base", "sparse", "bge-base"),
    ("rerank-bge-base", "rerank", "bge-base"),
]


# ---------------------------------------------------------------------------------------------
# The collection
# ---------------------------------------------------------------------------------------------


def sentence_pool(tokenizer_dir: Path, size: int, seed: int) -> list[str]:
    """`size` sentences of 8-22 Zipf-weighted whole words (plus a few code-ish terms), like bench_encode's."""
    vocab = [w.strip() for w in (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()]
    words = np.array([w for w in vocab[1996:] if w.isalpha() and len(w) > 1][:12000], dtype=object)
    extras = np.array(["gpu", "cuda", "config.yaml", "--batch-size", "v2.3.1", "http://localhost:8080", "k8s", "p99",
                       "embed_chunks()", "utf-8", "2026-11-24", "x86_64"], dtype=object)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    lengths = rng.integers(8, 23, size)
    picks = words[rng.choice(len(words), size=int(lengths.sum()), p=weights / weights.sum())]
    swap = rng.random(len(picks)) < 1 / 40
    picks[swap] = extras[rng.integers(0, len(extras), int(swap.sum()))]
    ends = rng.choice(np.array([".", ".", ".", "?", ":"], dtype=object), size)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pool = []
    for i in range(size):
        s = " ".join(picks[offsets[i]:offsets[i + 1]])
        pool.append(s[:1].upper() + s[1:] + ends[i])
    return pool


def build_collection(folder: Path, tokenizer_dir: Path, n: int, n_queries: int, seed: int,
                     sentences_per_chunk: float = 12.5) -> dict:
    """chunks.jsonl (N chunks: a heading and ~12 pooled sentences each) and queries.jsonl. Returns timings."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    pool = np.array(sentence_pool(tokenizer_dir, 50_000, seed), dtype=object)
    counts = np.clip(rng.normal(sentences_per_chunk, 5.0, n).round().astype(np.int64), 2, 27)
    picks = rng.integers(0, len(pool), int(counts.sum()))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    headings = rng.integers(0, len(pool), n)
    query_rows = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    queries = []
    block = 50_000
    with open(folder / "chunks.jsonl", "w", encoding="utf-8") as f:
        for b0 in range(0, n, block):
            lines = []
            for i in range(b0, min(n, b0 + block)):
                body = " ".join(pool[picks[offsets[i]:offsets[i + 1]]])
                heading = " ".join(pool[headings[i]].split(" ")[:4]).rstrip(".?:").title()
                # Words, digits and -_.:/() only: no character needs escaping in JSON except the newlines.
                lines.append(f'{{"id":"c{i:07d}","text":"## {heading}\\n\\n{body}"}}\n')
            f.write("".join(lines))
    for qi, row in enumerate(query_rows):
        words = " ".join(pool[picks[offsets[row]:offsets[row + 1]]]).split(" ")
        sample = rng.choice(len(words), size=min(6, len(words)), replace=False)
        text = "how to " + " ".join(words[j].strip(".?:").lower() for j in sorted(sample)) + "?"
        queries.append({"query_id": f"q{qi:04d}", "text": text, "gold_chunk_ids": [f"c{int(row):07d}"]})
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(q) + "\n" for q in queries))
    return {"seconds": time.perf_counter() - t0, "bytes": (folder / "chunks.jsonl").stat().st_size,
            "queries": len(queries)}


SMALL_SHAPES = {  # --small-models (CPU check of the script): same structure, tiny sizes
    "minilm-l6": (2, 64, 2, 128, "mean"),
    "bge-base": (2, 96, 2, 192, "cls"),
}


def build_registry(work: Path, tokenizer_dir: Path, device: str, small: bool, max_length: int) -> Path:
    if small:
        be.SHAPES.update(SMALL_SHAPES)
    kinds = [(kind, shape) for _, kind, shape in MODELS]
    folders = be.build_models(work / "models", tokenizer_dir, kinds, device)
    lines = ['[fusion]\nmethod = "concat"\n']
    for name, kind, shape in MODELS:
        lines.append(f'[[models]]\nname = "{name}"\nrole = "{kind}"\nbackend = "sentence-transformers"\n'
                     f'source = "path:{folders[(kind, shape)]}"\nmax_length = {max_length}\ndtype = "auto"\n')
        if kind == "dense":
            lines.append(f'dim = {be.SHAPES[shape][1]}\npooling = "{be.SHAPES[shape][4]}"\n'
                         f'weight = {0.8 if shape == "minilm-l6" else 0.2}\n')
        if kind == "sparse":
            lines.append("top_k = 256\n")
        lines.append("\n")
    path = work / "models.toml"
    path.write_text("".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# One run of the graph
# ---------------------------------------------------------------------------------------------


def graph_env(work: Path, label: str, registry: Path, extra: dict[str, str], fresh: bool = True) -> dict[str, str]:
    home = work / f"home-{label}"
    if fresh:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
    env = dict(os.environ)
    env.update({"DAGSTER_HOME": str(home), "RAG_CLEAN_DATA_ROOT": str(work / "data"),
                "RAG_CLEAN_STORAGE_ROOT": str(home / "rag_clean"), "RAG_CLEAN_MODEL_REGISTRY": str(registry),
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def step_times(dagster_home: Path) -> tuple[dict, dict]:
    """{step key: seconds} from the latest run's event log (STEP_START..STEP_SUCCESS/FAILURE), and the run's
    own start/end span. Read in a child process so this process never imports Dagster."""
    code = r"""
import json, sys
from dagster import DagsterInstance, DagsterEventType
inst = DagsterInstance.get()
run = inst.get_runs(limit=1)[0]
steps, first, last = {}, None, None
for e in inst.all_logs(run.run_id):
    first = e.timestamp if first is None else min(first, e.timestamp)
    last = e.timestamp if last is None else max(last, e.timestamp)
    d = e.dagster_event
    if d is None or not d.step_key:
        continue
    s = steps.setdefault(d.step_key, {})
    if d.event_type == DagsterEventType.STEP_START:
        s["start"] = e.timestamp
    elif d.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
        s["end"] = e.timestamp
        s["status"] = d.event_type.value
print(json.dumps({"run_id": run.run_id, "status": str(run.status), "first": first, "last": last, "steps": steps}))
"""
    env = dict(os.environ, DAGSTER_HOME=str(dagster_home))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    steps = {}
    for key, s in data["steps"].items():
        if "start" in s and "end" in s:
            steps[key] = {"seconds": round(s["end"] - s["start"], 3), "start": round(s["start"] - data["first"], 3),
                          "status": s.get("status")}
    return steps, {"run_id": data["run_id"], "status": data["status"],
                   "event_span_seconds": round(data["last"] - data["first"], 3)}


def _prune(value, depth=0):
    """The summary without what is long or beside the point here (toggles, metrics, per-batch lists)."""
    if isinstance(value, dict):
        return {k: _prune(v, depth + 1) for k, v in value.items()
                if k not in ("toggles", "provenance", "metrics", "batch_seconds", "events", "hybrid", "attempts")}
    if isinstance(value, list):
        return value if len(value) <= 20 else f"<{len(value)} items>"
    return value


def summary_stages(storage: Path) -> dict:
    """Per-stage duration and encode records from the processing summary (pruned)."""
    path = storage / "telemetry" / COLLECTION / "processing_summary.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    keep = ("performance_baseline", "stages", "dense_run", "sparse_run", "fused_run", "rerank_run")
    return {k: _prune(summary[k]) for k in keep if k in summary}


PROFILE_CODE = r"""
import cProfile, io, os, pstats, sys, time
from pathlib import Path
t0 = time.perf_counter()
from rag_clean.storage.layout import StorageLayout
from rag_clean.storage.arrow_io import read_arrow_table
from rag_clean.storage.parquet import read_table
from rag_clean.config.registry import load_registry
from rag_clean.config.plan import build_run_plan
from rag_clean.config.settings import EmbedderSettings
from rag_clean.stages.context import StageContext, StageIO
from rag_clean.stages.dense import dense_stage
registry, name, storage, collection, device, out = sys.argv[1:7]
os.environ.setdefault("RAG_CLEAN_TOKEN_CACHE", "0")  # measure tokenization too, as before the token cache
path = StorageLayout(Path(storage)).asset_file(["chunks"], collection)
imports = time.perf_counter() - t0
registry = load_registry(registry)
spec = registry.get(name)
plan = build_run_plan(registry, EmbedderSettings(ensemble_models=(name,), enable_sparse=False))
ctx = StageContext(collection, plan, StorageLayout(Path(storage)), device=device)
chunks = read_arrow_table(path) if path.suffix == ".arrow" else read_table(path)
prof = cProfile.Profile()
t1 = time.perf_counter()
prof.enable()
writer, record = dense_stage(ctx, StageIO(Path(out)), spec, chunks)
prof.disable()
total = time.perf_counter() - t1
text = io.StringIO()
pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
enc = record.encode
print(f"PROFILE imports {imports:.2f}s stage {total:.2f}s encode wall {enc.wall_seconds:.2f}s "
      f"load {enc.load_seconds:.2f}s tokenize {enc.tokenize_seconds:.2f}s")
print(text.getvalue())
"""


def profile_stage(work: Path, registry: Path, storage: Path, name: str, device: str, log) -> dict:
    """The dense stage of `name` alone (no Dagster) in a fresh process, under cProfile: where its time goes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROFILE_CODE, str(registry), name,
                           str(storage), COLLECTION, device, str(work / f"profile-{name}.arrow")],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout[proc.stdout.find("PROFILE"):] if "PROFILE" in proc.stdout else proc.stdout[-3000:] + proc.stderr[-3000:]
    (work / f"profile-{name}.txt").write_text(out)
    log(f"  profile {name}: process wall {wall:.1f}s; " + out.splitlines()[0] if out else "no output")
    return {"model": name, "process_wall_seconds": round(wall, 3), "returncode": proc.returncode,
            "text": out[:12000]}


# Issue 23: whole graph / encode-only on the same card.
TARGET_100K, TARGET_1M = 1.3, 1.15


def graph_runs(args) -> list[tuple[str, dict[str, str]]]:
    """(label, extra environment) of each graph run: --runs, else --token-cache, else one default run."""
    if args.runs:
        runs = []
        for item in filter(None, (x.strip() for x in args.runs.split(";"))):
            label, _, assignments = item.partition(":")
            extra = dict(a.split("=", 1) for a in assignments.split(",") if a)
            if label in {r[0] for r in runs}:
                label = f"{label}-{len(runs)}"  # a repeated label gets its own home
            runs.append((label, extra))
        return runs
    settings = [s for s in args.token_cache.split(",") if s] or [""]
    return [(s or "default", {"RAG_CLEAN_TOKEN_CACHE": "1" if s == "on" else "0"} if s else {}) for s in settings]


def run_graph(work: Path, label: str, registry: Path, extra_env: dict[str, str], log, select: str = "*",
              fresh: bool = True) -> dict:
    """One `dagster asset materialize` of `select`; `fresh=False` continues in the instance and storage of an
    earlier phase (same label) instead of starting a new one."""
    env = graph_env(work, label, registry, extra_env, fresh=fresh)
    py = sys.executable
    if fresh:
        for cmd in (["-m", "rag_clean_assets.collections", "init-home"], ["-m", "rag_clean_assets.collections", "add", COLLECTION]):
            subprocess.run([py, *cmd], env=env, check=True, capture_output=True, text=True)
    log_path = work / f"materialize-{label}{'' if select == '*' else '-' + ('first' if fresh else 'rest')}.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.run([py, "-m", "dagster", "asset", "materialize", "-m", "rag_clean_assets.definitions",
                               "--select", select, "--partition", COLLECTION], env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = {"label": label, "select": select, "env": extra_env, "returncode": proc.returncode, "wall_seconds": round(wall, 3),
              "peak_child_rss_mb": round(peak_rss / 1024, 1) if peak_rss > before else None, "log": str(log_path)}
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        log(f"  graph [{label}] FAILED rc={proc.returncode}\n{tail}")
        result["log_tail"] = tail
    try:
        result["steps"], result["run"] = step_times(Path(env["DAGSTER_HOME"]))
    except Exception as exc:  # a run that failed early may have no events worth reading
        result["steps_error"] = f"{type(exc).__name__}: {exc}"
    result["summary"] = summary_stages(Path(env["RAG_CLEAN_STORAGE_ROOT"]))
    log(f"  graph [{label}] rc={proc.returncode} wall {wall:.1f}s")
    for key, s in sorted(result.get("steps", {}).items(), key=lambda kv: kv[1]["start"]):
        log(f"    {key:45s} {s['seconds']:8.2f}s  (starts at {s['start']:7.2f}s)")
    return result


# The two phases of a split run: what needs only the chunks and the dense models, then the rest.
def first_select(registry_path: Path) -> str:
    from rag_clean.config.registry import load_registry

    dense = [spec.asset_name for spec in load_registry(registry_path).models if spec.role == "dense"]
    return ",".join(["chunks"] + [f"dense_embeddings/{name}" for name in dense])


REST_SELECT = "queries,sparse_vectors,fused_embeddings,reranked,vector_index,exports"


def merge_phases(first: dict, rest: dict, log) -> dict:
    """One run record from the two phases: wall times add (each phase pays its own process start and
    imports, so the sum overstates one process's wall by one start-up), steps are offset onto one timeline."""
    offset = first.get("run", {}).get("event_span_seconds", 0.0)
    steps = dict(first.get("steps", {}))
    for key, step in rest.get("steps", {}).items():
        steps[key] = {**step, "start": round(step["start"] + offset, 3)}
    merged = {**rest, "select": "*", "phases": [first, rest], "steps": steps,
              "wall_seconds": round(first["wall_seconds"] + rest["wall_seconds"], 3),
              "returncode": first["returncode"] or rest["returncode"]}
    log(f"  graph [two phases] wall {first['wall_seconds']:.1f}s + {rest['wall_seconds']:.1f}s = {merged['wall_seconds']:.1f}s")
    return merged


# ---------------------------------------------------------------------------------------------
# Encode-only: the same models on the same chunks, through the runner, no Dagster, no files
# ---------------------------------------------------------------------------------------------


def chunks_table(storage: Path):
    """The chunks the graph stored (Arrow IPC since the storage contract of issue 9; Parquet before)."""
    from rag_clean.storage.layout import StorageLayout
    from rag_clean.storage.arrow_io import read_arrow_table
    from rag_clean.storage.parquet import read_table

    path = StorageLayout(storage).asset_file(["chunks"], COLLECTION)
    return read_arrow_table(path) if path.suffix == ".arrow" else read_table(path)


def encode_only(registry_path: Path, storage: Path, device: str, n_pairs: int, log, sample: int = 0) -> dict:
    """Each model encode-only over the stored chunks. With `sample` (> 0, fewer than the chunks) it encodes
    the first `sample` chunks and scales the time by the token ratio: `seconds` is then that estimate for
    every chunk, `measured_seconds` what the sample took."""
    import torch

    from rag_clean.encoders.factory import load_dense_encoder, load_reranker, load_sparse_encoder
    from rag_clean.config.registry import load_registry

    table = chunks_table(storage)
    all_rows = table.num_rows
    texts = table.column("text").slice(0, sample or all_rows).to_pylist()
    token_scale = 1.0
    if sample and sample < all_rows:
        counts = table.column("token_count").to_numpy()
        token_scale = float(counts.sum()) / float(counts[:sample].sum())
    registry = load_registry(registry_path)
    out = {}
    rng = np.random.default_rng(0)
    qpath = Path(os.environ.get("RAG_CLEAN_DATA_ROOT", "")) / COLLECTION / "queries.jsonl"
    queries = [json.loads(line)["text"] for line in qpath.read_text().splitlines() if line.strip()]
    # What the graph reranks: each query against rerank_top_k candidates (20 by default).
    pairs = [(queries[i % len(queries)], texts[int(j)]) for i, j in enumerate(rng.integers(0, len(texts), n_pairs))]
    for spec in registry.models:
        t_load = time.perf_counter()
        if spec.role == "dense":
            enc = load_dense_encoder(spec, device)
        elif spec.role == "sparse":
            enc = load_sparse_encoder(spec, device)
        else:
            enc, record = load_reranker(spec, device)
            if enc is None:
                raise SystemExit(f"reranker {spec.name} did not load: {record['reason']}")
        load = time.perf_counter() - t_load
        warm_texts = texts[:256]
        if spec.role == "rerank":
            enc.score(pairs[:64])
        else:
            for _ in enc.encode(warm_texts):
                pass
        enc.stats.batches.clear()
        enc.stats.wall_seconds = enc.stats.tokenize_seconds = 0.0
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if spec.role == "rerank":
            enc.score(pairs)
        else:
            for _ in enc.encode(texts):
                pass
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = enc.stats.tokens
        scale = 1.0 if spec.role == "rerank" else token_scale
        out[spec.name] = {"role": spec.role, "seconds": round(seconds * scale, 3), "tokens": int(tokens * scale),
                          "tokens_per_s": tokens / seconds if seconds else None, "load_seconds": round(load, 3),
                          "tokenize_seconds": round(enc.stats.tokenize_seconds, 3),
                          "items": len(pairs) if spec.role == "rerank" else len(texts)}
        if scale != 1.0:
            out[spec.name].update({"measured_seconds": round(seconds, 3), "measured_tokens": tokens,
                                   "scaled_by_token_ratio": round(scale, 4)})
        log(f"  encode-only {spec.name:18s} {seconds:8.2f}s  {tokens / max(seconds, 1e-9) / 1e3:8.0f}k tok/s  "
            f"(load {load:.1f}s)" + (f"  -> {seconds * scale:.1f}s for every chunk" if scale != 1.0 else ""))
        enc.close()
        del enc
    return out


def _exit_on_sigterm(signum, frame):
    raise SystemExit(124)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_e2e"))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--token-cache", default="", help="comma list of on/off: one graph run each (RAG_CLEAN_TOKEN_CACHE)")
    p.add_argument("--runs", default="", help="graph runs of one call, ';'-separated LABEL[:VAR=VALUE,...], e.g. "
                   "'default;no-warmup:RAG_CLEAN_WARMUP=0' (A/B of engine switches on the same card)")
    p.add_argument("--small-models", action="store_true", help="tiny shapes (CPU check of this script)")
    p.add_argument("--skip-encode-only", action="store_true")
    p.add_argument("--profile-stage", default="", help="registry name of a dense model: profile its stage alone")
    p.add_argument("--rerank-top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", default="all", choices=["all", "first", "rest"],
                   help="first: build, then chunks + dense only; rest: the other assets in the same instance and "
                        "storage, then encode-only (two device calls when the whole graph outlasts one)")
    p.add_argument("--encode-only-chunks", type=int, default=0,
                   help="encode-only on this many chunks, scaled to all by tokens (default: every chunk)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.work = args.work.resolve()  # the instance and the collection add want absolute roots
    # A `timeout` kill still writes the JSON of what finished (the finally below).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log_lines: list[str] = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    device_label = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    report = {"date": time.strftime("%Y-%m-%d"), "device": device_label, "torch": torch.__version__,
              "python": platform.python_version(), "chunks": args.chunks, "queries": args.queries,
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "models": MODELS, "runs": []}
    state_path = args.work / "phase-first.json"
    try:
        if args.phase == "rest":
            # Continue the first phase's instance and storage (same machine, same --work).
            first = json.loads(state_path.read_text())
            registry = Path(first["registry"])
            report.update({k: first[k] for k in ("collection", "chunks", "queries")})
            log_lines.extend(first["log"])
            rest = run_graph(args.work, "default", registry, {}, log, select=REST_SELECT, fresh=False)
            report["runs"].append(merge_phases(first["run"], rest, log))
        else:
            shutil.rmtree(args.work, ignore_errors=True)
            args.work.mkdir(parents=True)
            tokenizer_dir = be.find_tokenizer_dir()
            report["collection"] = build_collection(args.work / "data" / COLLECTION, tokenizer_dir, args.chunks,
                                                    args.queries, args.seed)
            log(f"device {device_label}; collection of {args.chunks} chunks built in "
                f"{report['collection']['seconds']:.1f}s ({report['collection']['bytes'] / 2**20:.0f} MiB JSONL)")
            t0 = time.perf_counter()
            registry = build_registry(args.work, tokenizer_dir, device, args.small_models, args.max_length)
            log(f"random-init models built in {time.perf_counter() - t0:.1f}s")
            if args.phase == "first":
                run = run_graph(args.work, "default", registry, {}, log, select=first_select(registry))
                state_path.write_text(json.dumps({"registry": str(registry), "run": run, "log": log_lines,
                                                  **{k: report[k] for k in ("collection", "chunks", "queries")}}))
                report["runs"].append(run)
                return 0 if run["returncode"] == 0 else 1
            for label, extra in graph_runs(args):
                report["runs"].append(run_graph(args.work, label, registry, extra, log))
        ok = [r for r in report["runs"] if r["returncode"] == 0]
        if ok and not args.skip_encode_only:
            storage = args.work / f"home-{ok[0]['label']}" / "rag_clean"
            os.environ["RAG_CLEAN_DATA_ROOT"] = str(args.work / "data")
            report["encode_only"] = encode_only(registry, storage, device, args.queries * args.rerank_top_k, log,
                                                sample=args.encode_only_chunks)
            total = sum(v["seconds"] for v in report["encode_only"].values())
            report["encode_only_total_seconds"] = round(total, 3)
            tokens = report["encode_only"]
            for r in ok:
                r["ratio_whole_graph_to_encode_only"] = round(r["wall_seconds"] / total, 3)
                log(f"  [{r['label']}] whole graph {r['wall_seconds']:.1f}s / encode-only {total:.1f}s = "
                    f"{r['ratio_whole_graph_to_encode_only']:.2f} (target <= {TARGET_1M if args.chunks >= 1_000_000 else TARGET_100K})")
            report["tokens_per_model"] = {k: v["tokens"] for k, v in tokens.items()}
        if ok and args.profile_stage:
            storage = args.work / f"home-{ok[0]['label']}" / "rag_clean"
            report["profile"] = profile_stage(args.work, registry, storage, args.profile_stage, device, log)
    finally:
        report["log"] = log_lines
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))
            print(f"wrote {args.out}")
    return 0 if report["runs"] and all(r["returncode"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
