"""`rag-clean search` and `rag-clean mcp`: query a collection's vector index, from a shell or an MCP client.

    rag-clean search --collection sample "how do I rotate the repository key?" -k 5
    rag-clean search --collection sample "restore a snapshot" --json --no-rerank
    rag-clean mcp                      # stdio MCP server: tools `search` and `list_collections`

Both rank as the collection's `reranked` asset did (rag_clean.search). The query is printed nowhere and logged
nowhere; the JSON output holds the results only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

SUBCOMMANDS = ("search", "mcp")
TEXT_PREVIEW = 240   # characters of each result's text in the human-readable listing


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-root", metavar="DIR", help="where the asset files, ranking state and embedded index "
                   "are. Default: $RAG_CLEAN_STORAGE_ROOT, else $DAGSTER_HOME/rag_clean (as rag-clean writes them).")
    p.add_argument("--registry", metavar="FILE", help="model registry TOML (the one the collection was embedded "
                   "with). Default: $RAG_CLEAN_MODEL_REGISTRY, else the bundled rag_clean/models.toml.")
    p.add_argument("--config", metavar="FILE", help="settings file (index sink and server URL live there or in "
                   "EMBEDDER_* variables). Default: $EMBEDDER_CONFIG_FILE, else ./config/embedder.json.")
    p.add_argument("--env-file", metavar="FILE", help=".env file with EMBEDDER_* keys. Default: ./.env when present.")
    p.add_argument("--device", default="cpu", help="where the query encoders and the reranker run (default cpu; "
                   "e.g. cuda, cuda:1)")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "search":
        p = argparse.ArgumentParser(prog="rag-clean search", description="Search a collection's vector index with "
                                    "the ranking its `reranked` asset measured.")
        p.add_argument("query", help="the query text (never logged or stored)")
        p.add_argument("--collection", required=True, metavar="NAME", help="collection (partition) name")
        p.add_argument("-k", type=int, default=10, metavar="K", help="results to return (default 10)")
        p.add_argument("--no-rerank", dest="rerank", action="store_false",
                       help="skip the cross-encoder: hybrid retrieval order")
        p.add_argument("--json", action="store_true", help="print one JSON object: {collection, results, warnings}")
    else:
        p = argparse.ArgumentParser(prog="rag-clean mcp", description="MCP server over stdio (tools: search, "
                                    "list_collections). Add it to an MCP client as the command `rag-clean mcp`.")
    _common(p)
    return p


def _settings(args):
    from rag_clean.config.settings import resolve_settings

    for flag, value in (("--config", args.config), ("--env-file", args.env_file), ("--registry", args.registry)):
        if value and not Path(value).expanduser().is_file():
            raise ValueError(f"{flag} {value}: file does not exist")
    return resolve_settings(config_file=Path(args.config).expanduser() if args.config else None,
                            dotenv_file=Path(args.env_file).expanduser() if args.env_file else None)


def _storage_root(args) -> Path | None:
    if args.storage_root:
        return Path(args.storage_root).expanduser().resolve()
    from rag_clean.config.paths import DEFAULT_DAGSTER_HOME
    from rag_clean.config.settings import process_setting

    if not process_setting("storage_root") and not os.environ.get("DAGSTER_HOME"):
        # What `rag-clean` itself uses when DAGSTER_HOME is unset, so search finds what it embedded.
        os.environ["DAGSTER_HOME"] = str(DEFAULT_DAGSTER_HOME)
    return None


def _print_results(collection: str, results, warnings: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"collection": collection, "results": [r.to_dict() for r in results],
                          "warnings": warnings}, ensure_ascii=False))
        return
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not results:
        print("no results")
    for rank, r in enumerate(results, start=1):
        rerank = "" if r.rerank_score is None else f"  rerank {r.rerank_score:.4f}"
        print(f"{rank:>3}. {r.chunk_id}  score {r.score:.4f}{rerank}")
        print(f"     {r.source_file}" + (f" > {r.heading}" if r.heading else ""))
        text = " ".join(r.text.split())
        print(f"     {text[:TEXT_PREVIEW]}{'...' if len(text) > TEXT_PREVIEW else ''}")


def run(command: str, args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    settings = _settings(args)
    storage_root = _storage_root(args)
    registry = str(Path(args.registry).expanduser().resolve()) if args.registry else None
    if command == "mcp":
        from rag_clean.search.mcp_server import serve

        serve(storage_root=storage_root, registry=registry, settings=settings, device=args.device)
        return 0
    from rag_clean.search import Searcher

    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    with Searcher(args.collection, storage_root=storage_root, registry=registry, settings=settings,
                  device=args.device) as searcher:
        results = searcher.search(args.query, k=args.k, rerank=args.rerank)
        _print_results(args.collection, results, list(searcher.warnings), args.json)
    return 0


def main(argv: Sequence[str]) -> int:
    """`argv` starts with the subcommand ("search" or "mcp")."""
    command, rest = argv[0], list(argv[1:])
    args = build_parser(command).parse_args(rest)
    try:
        return run(command, args)
    except (ValueError, RuntimeError, OSError) as exc:  # SearchError, RankingStateError, VectorIndexError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
