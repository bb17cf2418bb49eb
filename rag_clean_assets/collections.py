"""Collection partitions from the command line (the CLI way to add one), and the run report.

    python -m rag_clean_assets.collections add <name>    # add one partition (its folder must exist)
    python -m rag_clean_assets.collections sync          # add a partition for every folder under the data root
    python -m rag_clean_assets.collections list
    python -m rag_clean_assets.collections init-home [--gpu-pool-limit N]  # write $DAGSTER_HOME/dagster.yaml (see instance.py)
    python -m rag_clean_assets.collections reclaim       # fail runs whose process died, free their pool slots
    python -m rag_clean_assets.collections report <name> # where the outputs are, and the headline numbers
    python -m rag_clean_assets.collections observe [name ...]  # record which collection folders changed (as the sensor does)
    python -m rag_clean_assets.collections status <name> # per asset: fresh, stale (and why), upstream stale, missing

Needs DAGSTER_HOME: without it the Dagster CLI uses a throwaway instance that knows no partitions.
"""

import argparse
import os
import sys
from pathlib import Path

import dagster as dg

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.registry import RegistryError
from rag_clean.config.settings import SettingsError
from rag_clean.storage.errors import StorageError
from rag_clean.storage.names import check_name
from rag_clean.telemetry.summary import read_summary
from rag_clean_assets.instance import CONFIG_MARKER, dagster_yaml, reclaim_dead_runs
from rag_clean_assets.partitions import COLLECTIONS_PARTITION
from rag_clean_assets.sensors import skipped_folder_line
from rag_clean.telemetry.readable import metrics_text
from resources.paths import PathsResource

def _instance() -> dg.DagsterInstance:
    if not os.environ.get("DAGSTER_HOME"):
        sys.exit("error: set DAGSTER_HOME so partitions persist and the UI and CLI share them")
    return dg.DagsterInstance.get()


def init_home(gpu_pool_limit: int | None = None) -> Path:
    """gpu_pool_limit: the `gpu` pool's limit = GPU steps at once; None: $RAG_CLEAN_GPU_POOL_LIMIT, else one
    per visible GPU, else (no CUDA) no limit (rag_clean_assets.instance.gpu_pool_limit)."""
    if gpu_pool_limit is not None and gpu_pool_limit < 1:
        raise ValueError(f"gpu pool limit must be >= 1, got {gpu_pool_limit}")
    home = Path(os.environ.get("DAGSTER_HOME") or sys.exit("error: set DAGSTER_HOME"))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    environ = dict(os.environ)
    if gpu_pool_limit is not None:  # the flag wins over $RAG_CLEAN_GPU_POOL_LIMIT and the GPU count
        environ[BY_KEY["gpu_pool_limit"].env] = str(gpu_pool_limit)
    wanted = dagster_yaml(environ)
    # Rewrite only a file we wrote (an older version of it too); a file the user owns stays as it is.
    if not config.exists() or (config.read_text(encoding="utf-8").startswith(CONFIG_MARKER)
                               and config.read_text(encoding="utf-8") != wanted):
        config.write_text(wanted, encoding="utf-8")
    return config


def add(names: list[str], paths: PathsResource | None = None) -> list[str]:
    paths = paths or PathsResource()
    for name in names:
        paths.collection_dir(check_name(name))  # refuses names without a folder under the data root
    instance = _instance()
    known = set(instance.get_dynamic_partitions(COLLECTIONS_PARTITION))
    new = [n for n in names if n not in known]
    if new:
        instance.add_dynamic_partitions(COLLECTIONS_PARTITION, new)
    return new


def report(collection: str, wall_seconds: float | None = None) -> dict:
    paths = PathsResource()
    root = paths.storage_dir()
    summary = read_summary(paths.layout().summary_file(collection))
    files = sorted(str(p.relative_to(root)) for p in root.rglob(f"{collection}.*") if not p.name.startswith("."))
    rerank = summary["rerank_run"]
    stages = summary["stages"]
    metrics = (stages.get("reranked") or {}).get("metrics", {})
    lines = [
        f"collection {collection!r}: {summary['chunk_count']} chunks",
        f"storage root: {root}",
        *[f"  {f}" for f in files],
        f"  telemetry/{collection}/processing_summary.json (schema {summary['schema_version']}), events.jsonl",
        f"dense models: {', '.join(summary['dense_run']['models_executed'])} on {summary['dense_run']['device']}",
        f"sparse: {summary['sparse_run']['status']}; rerank: {rerank['status']} (scorer: {rerank.get('scorer')})",
        "retrieval metrics:",
        *[f"  {line}" for line in metrics_text(metrics)],
    ]
    if wall_seconds is not None:
        lines.append(f"wall time of the materialization: {wall_seconds:.0f} s")
    lines += [
        "open the UI:  DAGSTER_HOME=" + os.environ.get("DAGSTER_HOME", "<home>") + " .venv/bin/rag-clean ui",
        "read vectors: python -c \"from rag_clean.storage.embeddings import read_embeddings; "
        f"e = read_embeddings('{root}/fused_embeddings/{collection}.arrow'); print(e.vectors.shape)\"",
    ]
    print("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rag-clean-collections", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    init_p = sub.add_parser("init-home")
    init_p.add_argument("--gpu-pool-limit", type=int, default=None, metavar="N",
                        help="GPU steps at once; default $RAG_CLEAN_GPU_POOL_LIMIT, else one per visible GPU, "
                             "else no limit (no CUDA). A dagster.yaml you edited (marker line removed) is kept")
    add_p = sub.add_parser("add")
    add_p.add_argument("names", nargs="+")
    sub.add_parser("sync")
    sub.add_parser("list")
    sub.add_parser("reclaim")
    obs = sub.add_parser("observe", help="record a collection_files observation for every collection whose files "
                                         "changed (what the sensor does on each tick); default: every partition")
    obs.add_argument("names", nargs="*")
    st = sub.add_parser("status", help="what is out of date in one collection, per asset (Dagster's stale status, "
                                       "plus 'upstream stale' for assets below a stale one)")
    st.add_argument("name")
    rep = sub.add_parser("report")
    rep.add_argument("name")
    rep.add_argument("--wall-seconds", type=float)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (SettingsError, RegistryError) as exc:  # a bad RAG_CLEAN_* value or registry: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "init-home":
        print(f"dagster instance config: {init_home(args.gpu_pool_limit)}")
    elif args.command in ("add", "sync"):
        try:
            if args.command == "add":
                new = add(args.names)
                print(f"added partitions: {new}" if new else f"partitions already known: {args.names}")
            else:
                names, unusable = PathsResource().scan_collections()
                for folder, reason in unusable:  # the sensor logs the same lines
                    print(skipped_folder_line(folder, reason))
                new = add(names) if names else []
                print(f"collections under the data root: {names}; newly added: {new}")
        except StorageError as exc:  # a bad name or folder is the user's to fix: one line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.command == "list":
        print("\n".join(_instance().get_dynamic_partitions(COLLECTIONS_PARTITION)))
    elif args.command == "reclaim":
        released = reclaim_dead_runs(_instance())
        for run_id, reason in released.items():
            print(f"run {run_id}: marked failed, pool slots freed ({reason})")
        if not released:
            print("no dead runs hold pool slots")
    elif args.command == "observe":
        from rag_clean_assets.observe import observe_collections

        try:
            changed = observe_collections(_instance(), PathsResource(), args.names or None)
        except (StorageError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"changed collections (observed): {', '.join(changed)}" if changed else "no collection folder changed")
    elif args.command == "status":
        from rag_clean_assets.definitions import build_definitions
        from rag_clean_assets.staleness import partition_status

        for key, status in partition_status(_instance(), build_definitions(), check_name(args.name)).items():
            print(f"{key:32} {status.status}" + (f"  ({'; '.join(status.causes)})" if status.causes else ""))
    elif args.command == "report":
        report(check_name(args.name), args.wall_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
