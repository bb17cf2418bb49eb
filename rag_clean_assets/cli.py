"""rag-clean: the successor of the old embedder's `embed_collections_v6.py`, with the same flags.

For each selected collection it materializes the whole asset graph (the `embed_collection` job) in the
Dagster instance the UI uses ($DAGSTER_HOME), then prints a summary. Settings precedence, lowest to
highest: defaults < config file < .env < environment < these flags (recorded as provenance "cli").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

EPILOG = """\
precedence (lowest to highest), recorded per setting in processing_summary.json:
  defaults < config file (--config, else $EMBEDDER_CONFIG_FILE, else ./config/embedder.json: keys such as
  enable_rerank, enable_sparse, sparse_models) < .env (--env-file, else ./.env) < environment
  (EMBEDDER_ENABLE_RERANK, EMBEDDER_ENABLE_SPARSE, EMBEDDER_SPARSE_MODELS, EMBEDDER_ENABLE_EXPORTS, ...)
  < command-line flags. RAG_CLEAN_* (roots, registry, executor, GPU lease, engine switches) are read from
  the environment only. Every setting: python -m rag_clean.config.settings --markdown

runs are recorded in the Dagster instance at $DAGSTER_HOME (default: <project>/.dagster_home), so the UI
(rag-clean ui) shows them.

exit status: 0 all collections done; 1 a run failed; 2 bad arguments, settings, registry or a missing
collection folder.

search the embedded collections: rag-clean search --collection NAME "query" [-k 10] [--no-rerank] [--json];
serve them to an MCP client over stdio: rag-clean mcp (see rag-clean search --help, rag-clean mcp --help).
the Dagster UI (webserver + daemon) over the same instance: rag-clean ui [--port 3000] (Ctrl-C stops it).
"""


class CliError(Exception):
    """A usage problem: printed as 'error: ...' with exit status 2."""


def _split(values: Sequence[str] | None) -> list[str] | None:
    """--x a,b  and  --x a b  both give [a, b]."""
    if values is None:
        return None
    return [item.strip() for v in values for item in v.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-clean", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunked-dir", metavar="DIR",
                   help="data root: one folder per collection (e.g. Chunked/<collection>/*_chunks.json). "
                        "Default: $RAG_CLEAN_DATA_ROOT, else the bundled data/collections.")
    p.add_argument("--output-dir", metavar="DIR",
                   help="export folder: turns exports on and writes <DIR>/<collection>/<collection>_embeddings.npy, "
                        "per-model .npy, _qdrant.jsonl, _sparse.jsonl, _metadata.json, _stats.json and "
                        "_processing_summary.json. Without it exports follow enable_exports / export_dir settings.")
    p.add_argument("--collections", nargs="+", metavar="NAME",
                   help="collections to run (comma- or space-separated). A name is a folder under the data root; "
                        "a path to a folder (e.g. Chunked/docs) also works when --chunked-dir is not given. "
                        "Default: every folder under the data root.")
    p.add_argument("--ensemble-models", nargs="+", metavar="MODEL",
                   help="dense registry models to fuse (comma- or space-separated). Default: every dense model.")
    p.add_argument("--exclusive-ensemble", action=argparse.BooleanOptionalAction, default=None,
                   help="retired, accepted for old scripts: the asset graph always keeps one dense model resident "
                        "per device (one asset per model, GPU steps in the 'gpu' pool); a given value is reported "
                        "in the run's warnings and ignored.")
    rerank = p.add_mutually_exclusive_group()
    rerank.add_argument("--enable-rerank", dest="enable_rerank", action="store_const", const=True, default=None,
                        help="rerank candidates with the registry's cross-encoder (fallback chain applies)")
    rerank.add_argument("--disable-rerank", dest="enable_rerank", action="store_const", const=False,
                        help="skip the cross-encoder; reranked keeps retrieval order")
    sparse = p.add_mutually_exclusive_group()
    sparse.add_argument("--enable-sparse", dest="enable_sparse", action="store_const", const=True, default=None,
                        help="compute sparse vectors (SPLADE / bge-m3 lexical)")
    sparse.add_argument("--disable-sparse", dest="enable_sparse", action="store_const", const=False,
                        help="skip sparse vectors (the previous sparse file stays; exports omit it)")
    p.add_argument("--sparse-models", nargs="+", metavar="MODEL",
                   help="sparse registry models to run (comma- or space-separated). Default: every sparse model.")
    p.add_argument("--config", metavar="FILE", help="config file (JSON or TOML). Default: $EMBEDDER_CONFIG_FILE, "
                                                     "else ./config/embedder.json when present.")
    p.add_argument("--env-file", metavar="FILE", help=".env file with EMBEDDER_* keys. Default: ./.env when present.")
    p.add_argument("--registry", metavar="FILE", help="model registry TOML. Default: $RAG_CLEAN_MODEL_REGISTRY, "
                                                       "else the bundled rag_clean/models.toml.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="Dagster run log level on the console (default INFO; DEBUG shows every step event)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "lines"],
                   help="progress per collection and step: a live bar per step on a terminal, plain lines "
                        "otherwise (auto, the default); bar or lines force one")
    p.add_argument("--storage-root", metavar="DIR", help="where asset files and telemetry go. Default: "
                                                          "$RAG_CLEAN_STORAGE_ROOT, else $DAGSTER_HOME/rag_clean.")
    return p


def _default_dagster_home() -> Path:
    """$DAGSTER_HOME, set to <project>/.dagster_home when unset (the default storage root lives in it)."""
    from rag_clean.config.paths import DEFAULT_DAGSTER_HOME

    if not os.environ.get("DAGSTER_HOME"):
        home = DEFAULT_DAGSTER_HOME
        os.environ["DAGSTER_HOME"] = str(home)
        print(f"DAGSTER_HOME was not set: using {home} (start the UI with the same DAGSTER_HOME to see these runs)")
    return Path(os.environ["DAGSTER_HOME"])


def _select_collections(requested: list[str] | None, chunked_dir: str | None) -> tuple[Path, list[str]]:
    """(data root, collection names); a requested path to a folder sets the data root to its parent."""
    from rag_clean.config import paths as default_paths
    from rag_clean.storage.errors import StorageError
    from rag_clean.storage.names import check_name

    root = Path(chunked_dir).expanduser().resolve() if chunked_dir else None
    names: list[str] = []
    for item in requested or []:
        if "/" in item or os.sep in item:
            folder = Path(item).expanduser().resolve()
            if root is None:
                root = folder.parent
            elif folder.parent != root:
                raise CliError(f"collection folder {folder} is not under the data root {root} (--chunked-dir)")
            item = folder.name
        names.append(item)
    root = root or default_paths.data_root()
    if not root.is_dir():
        raise CliError(f"data root {root} does not exist (--chunked-dir)")
    if requested is None:
        from rag_clean_assets.sensors import skipped_folder_line
        from resources.paths import PathsResource

        # The same scan as the sensor and `collections sync`: every other folder is reported, one line each.
        names, unusable = PathsResource(data_root=str(root)).scan_collections()
        for folder, reason in unusable:  # name it with --collections to make it an error instead
            print(f"note: {skipped_folder_line(folder, reason)}", file=sys.stderr)
        if not names:
            raise CliError(f"no collection folders under the data root {root}")
    for name in names:
        try:
            check_name(name)
        except StorageError as exc:
            raise CliError(str(exc)) from exc
        if not (root / name).is_dir():
            raise CliError(f"collection {name!r}: folder {root / name} does not exist")
    return root, list(dict.fromkeys(names))


def error_line(error) -> str:
    """One line for a failed step: every message of the cause chain, outermost first (ours name the file,
    record, key or variable; the innermost is often a bare UnicodeDecodeError or JSONDecodeError), without
    Dagster's own wrapper and without a message that only repeats the one before it."""
    parts: list[str] = []
    while error is not None:
        message = " ".join((error.message or "").split())
        if message and not error.cls_name.startswith("Dagster") and not any(message in p for p in parts):
            parts.append(message)
        error = error.cause
    return " <- ".join(parts) or "step failed"


def _step_errors(result) -> list[str]:
    return [f"{event.step_key}: {error_line(event.step_failure_data.error)}"
            for event in result.all_events if event.is_step_failure]


def _print_summary(collection: str, storage_root: Path, run_id: str, wall_s: float) -> None:
    from rag_clean.storage.layout import StorageLayout
    from rag_clean.telemetry.quality_text import quality_lines
    from rag_clean.telemetry.summary import read_summary

    path = StorageLayout(storage_root).summary_file(collection)
    s = read_summary(path)
    toggles, prov = s["feature_toggles"], s["feature_toggles"]["provenance"]
    dense, sparse, rerank = s["dense_run"], s["sparse_run"], s["rerank_run"]
    stages = s.get("stages", {})
    exports = stages.get("exports") or {}
    lines = [
        f"== {collection}: {s['chunk_count']} chunks (run {run_id}, {wall_s:.1f} s)",
        f"   dense: {', '.join(dense['models_executed'])} on {dense['device']}; "
        f"{dense['total_embeddings_generated']} embedded, {dense.get('chunks_reused', 0)} reused; "
        f"batch latency p50 {float(dense['latency_seconds']['p50']):.2f} s",
        f"   sparse: {sparse['status']} (enable_sparse={str(toggles['enable_sparse']).lower()} from {prov.get('enable_sparse')}; "
        f"models {', '.join(sparse['model_names']) or '-'}; coverage {sparse['vectors']['coverage_ratio']}; "
        f"fallback_used {str(sparse['fallback_used']).lower()})",
        f"   rerank: {rerank['status']} (enable_rerank={str(toggles['enable_rerank']).lower()} from {prov.get('enable_rerank')}; "
        f"model {rerank['model_name'] or '-'}; fallback_count {rerank['fallback_count']})",
    ]
    chunks = stages.get("chunks") or {}
    if chunks.get("skipped"):
        lines.append(f"   input: {chunks.get('files_read', 0)} files read, {chunks['skipped']} inputs skipped "
                     "(each named in the summary's stages.chunks.skips)")
    # The queries, the weights used and why, each system's metrics and the final ranking's table.
    lines += [f"   {line}" for line in quality_lines(s)]
    lines.append(f"   summary: {path} (schema {s['schema_version']})")
    lines.append(f"   asset files: {storage_root}")
    if exports.get("status") == "ok":
        lines.append(f"   exports: {exports.get('export_dir')} ({len(exports.get('files', []))} files)")
    else:
        lines.append(f"   exports: {exports.get('status', 'not materialized')} (turn on with --output-dir DIR)")
    for warning in s.get("warnings", []):
        short = warning if len(warning) <= 300 else warning[:300] + " ... (full text in the summary)"
        lines.append(f"   warning: {short}")
    print("\n".join(lines), flush=True)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rag_clean.config.plan import PlanError
    from rag_clean.config.registry import RegistryError
    from rag_clean.config.settings import SettingsError
    from rag_clean_assets.pods import PodConfigError

    # Bad input found before a run starts (settings, registry, model sources, roots, pod config) is the
    # user's to fix: one line each, exit status 2, no traceback.
    try:
        return _run(args)
    except (SettingsError, RegistryError, PlanError, PodConfigError) as exc:
        raise CliError(str(exc)) from exc


def _run(args: argparse.Namespace) -> int:
    import dagster as dg

    from rag_clean.config.paths import check_roots
    from rag_clean.config.plan import build_run_plan
    from rag_clean.config.registry import load_registry
    from rag_clean.config.settings import process_provenance_lines
    from rag_clean_assets.collections import init_home
    from rag_clean_assets.definitions import EMBED_JOB_NAME, build_definitions
    from rag_clean_assets.partitions import COLLECTIONS_PARTITION
    from rag_clean_assets.run_progress import LOGGER_KEY as PROGRESS_LOGGER
    from rag_clean_assets.run_progress import RunProgress, asset_steps
    from rag_clean_assets.console_log import short_console_logger_def
    from rag_clean_assets.run_progress import logger_def as progress_logger_def
    from resources.paths import PathsResource
    from resources.settings import EmbedderSettingsResource

    environment = process_provenance_lines()  # every RAG_CLEAN_* value given, parsed now, not mid-run
    for flag, value in (("--config", args.config), ("--env-file", args.env_file), ("--registry", args.registry)):
        if value and not Path(value).expanduser().exists():
            raise CliError(f"{flag} {value}: file does not exist")
    data_root, collections = _select_collections(_split(args.collections), args.chunked_dir)
    registry_path = str(Path(args.registry).expanduser().resolve()) if args.registry else ""
    registry = load_registry(registry_path or None)  # --registry wins over $RAG_CLEAN_MODEL_REGISTRY

    overrides = {
        "enable_rerank": args.enable_rerank,
        "enable_sparse": args.enable_sparse,
        "sparse_models": _split(args.sparse_models),
        "ensemble_models": _split(args.ensemble_models),
        "exclusive_ensemble": args.exclusive_ensemble,
    }
    if args.output_dir:
        overrides.update(enable_exports=True, export_dir=str(Path(args.output_dir).expanduser().resolve()))
    settings = EmbedderSettingsResource(
        config_file=str(Path(args.config).expanduser().resolve()) if args.config else "",
        dotenv_file=str(Path(args.env_file).expanduser().resolve()) if args.env_file else "",
        override_source="cli",
        **{k: v for k, v in overrides.items() if v is not None},
    )
    resolved = settings.resolve()
    # The plan each run builds: bad model names and model sources that resolve nowhere fail here, before any run.
    build_run_plan(registry, resolved)
    for note in resolved.notes:
        print(f"note: {note}", file=sys.stderr)

    _default_dagster_home()
    storage_root = (Path(args.storage_root).expanduser().resolve() if args.storage_root
                    else PathsResource(data_root=str(data_root)).storage_dir())
    check_roots(data_root, storage_root)  # before anything is written: the instance folder included
    init_home()
    print(f"data root: {data_root}\nstorage root: {storage_root}\nDagster instance: {os.environ['DAGSTER_HOME']}\n"
          f"registry: {registry.path}")
    # Settings a person chose (or all of them with --log-level DEBUG); the defaults are one count, not 30 lines.
    chosen = [*resolved.provenance_lines(chosen_only=args.log_level != "DEBUG"), *environment]
    defaults = len(resolved.provenance_lines()) + len(environment) - len(chosen)
    for line in chosen:
        if line.startswith("hybrid_dense_weight="):
            # A fallback, not the weight of every run: each collection's summary says which weights were used.
            line += "; used only where tuning is not trusted (see each collection's hybrid weights below)"
        print(f"   {line}")
    if defaults:
        print(f"   ({defaults} other settings at their defaults: --log-level DEBUG lists them; each "
              "collection's processing_summary.json keeps every value)")

    # The progress display listens to every run as a second Dagster logger (rag_clean_assets/run_progress.py).
    view = RunProgress({}, tty=None if args.progress == "auto" else args.progress == "bar")
    defs = build_definitions(registry_path or None, data_root=str(data_root), storage_root=str(storage_root),
                             settings=settings, loggers={"console": short_console_logger_def(),
                                                         PROGRESS_LOGGER: progress_logger_def(view)})
    view.step_names = asset_steps(defs)
    job = defs.resolve_job_def(EMBED_JOB_NAME)
    failed: list[str] = []
    with dg.DagsterInstance.get() as instance, view:
        known = set(instance.get_dynamic_partitions(COLLECTIONS_PARTITION))
        new = [c for c in collections if c not in known]
        if new:
            instance.add_dynamic_partitions(COLLECTIONS_PARTITION, new)
            print(f"added partitions: {', '.join(new)}")
        for collection in collections:
            print(f"-- materializing {collection} ...", flush=True)
            t0 = time.perf_counter()
            view.start_collection(collection)
            result = job.execute_in_process(
                partition_key=collection, instance=instance, raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": args.log_level}}, PROGRESS_LOGGER: {}}},
                tags={"rag_clean/launched_by": "rag-clean"})
            view.finish_collection(result.success)
            wall = time.perf_counter() - t0
            if not result.success:
                failed.append(collection)
                print(f"error: collection {collection!r}: run {result.run_id} failed", file=sys.stderr)
                for message in _step_errors(result):
                    print(f"   {message}", file=sys.stderr)
                continue
            _print_summary(collection, storage_root, result.run_id, wall)
    if failed:
        print(f"error: {len(failed)} of {len(collections)} collections failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("search", "mcp"):  # the old flags are all options, so a first word is a subcommand
        from rag_clean_assets.search_cli import main as subcommand

        return subcommand(argv)
    if argv and argv[0] == "ui":
        from rag_clean_assets.ui import main as ui

        return ui(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
