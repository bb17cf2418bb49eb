"""Where every file of the storage root goes: the one owner of paths.

    <root>/<asset key path>/<collection>.<ext>             asset files (.arrow: chunks and embedding matrices, else .parquet)
    <root>/chunks/_files/<c>.parquet                       the chunks stage's file manifest (which rows each input file gave)
    <root>/sparse_vectors/_joint/<dense model>/<c>.parquet  lexical rows of a bge-m3 dense pass (a cache, not an asset)
    <root>/colbert_vectors/<dense model>/<c>.arrow          ColBERT multi-vectors of that pass
    <root>/telemetry/<c>/processing_summary.json, events.jsonl
    <root>/state/token_budgets.json                        safe token budgets per model and device
    <root>/state/weights_digests.json                      model file digests by (path, size, mtime_ns)
    <root>/reranked/_cache/<kind>/<model>/<c>.parquet      retrieval caches: query-side vectors, rerank scores
    <root>/state/export_lines/<c>/<file kind>.parquet      byte ranges of the previous export's JSONL lines
    <root>/state/folder_hashes/<c>.json                    file digests behind a collection folder's version
    <root>/state/ranking/<c>.json                          what reranked chose (hybrid weights, pool sizes, reranker): search reads it
    <root>/state/token_ids/<c>/<tokenizer fingerprint>.arrow  token ids of the chunks, shared by models of one tokenizer
    <root>/exports/<c>/...                                 export files, unless export_dir names another folder
    <root>/vector_index/_edge/<c>/                          the Qdrant Edge shard of a collection (the vector_index sink)

Every name is checked (`check_name`) and every path resolved under its root (`path_under`), so no
collection or model name can point a write outside the storage root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rag_clean.storage.names import check_name, path_under

# Assets whose value is an embedding matrix (Arrow IPC, memory-mapped).
EMBEDDING_ROOTS = ("dense_embeddings", "fused_embeddings")
# Tables stored as uncompressed Arrow IPC with one record batch, loaded memory-mapped: what every stage
# reads whole (zero-copy slices, file pages instead of anonymous memory). Everything else is Parquet.
ARROW_TABLE_ROOTS = ("chunks",)
# Not a valid collection name (check_name), so it never clashes with chunks/<collection>.arrow.
FILES_DIR = "_files"
# Not a valid collection name (check_name), so it never clashes with sparse_vectors/<collection>.
JOINT_DIR = "_joint"
# Same reason: "_cache" can never be a collection, so reranked/_cache/ never clashes with reranked/<c>.parquet.
CACHE_DIR = "_cache"
# Same reason: "_edge" is never a collection, so vector_index/_edge/ never clashes with vector_index/<c>.parquet.
EDGE_DIR = "_edge"
# What the reranked stage caches (rag_clean/retrieval/cache.py): query-side encodings and cross-encoder scores.
RETRIEVAL_CACHE_KINDS = ("query_vectors", "masked_gold", "sparse_queries", "sparse_masked", "rerank_pairs")


def suffix_for(asset_path: Sequence[str]) -> str:
    return ".arrow" if asset_path[0] in EMBEDDING_ROOTS + ARROW_TABLE_ROOTS else ".parquet"


def is_embedding_file(asset_path: Sequence[str]) -> bool:
    return asset_path[0] in EMBEDDING_ROOTS


@dataclass(frozen=True)
class StorageLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    # -- asset files -------------------------------------------------------------------------

    def asset_file(self, asset_path: Sequence[str], collection: str) -> Path:
        parts = [check_name(p, "asset key part") for p in asset_path]
        return path_under(self.root, *parts, check_name(collection) + suffix_for(asset_path))

    def staged_asset_file(self, asset_path: Sequence[str], collection: str) -> Path:
        """The asset file, with its folder created: streaming writers stage temp files beside it, so
        publishing is a rename on one filesystem."""
        path = self.asset_file(asset_path, collection)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def chunks_manifest_file(self, collection: str) -> Path:
        """Per input file of a collection: its sha256, the chunking config and which rows of the chunks
        file it gave, so the next run re-parses only new or changed files."""
        return path_under(self.root, "chunks", FILES_DIR, check_name(collection) + ".parquet")

    # -- side files of a bge-m3 joint pass -----------------------------------------------------

    def joint_sparse_file(self, dense_asset_name: str, collection: str) -> Path:
        return path_under(self.root, "sparse_vectors", JOINT_DIR, check_name(dense_asset_name, "model"),
                          check_name(collection) + ".parquet")

    def colbert_file(self, dense_asset_name: str, collection: str) -> Path:
        return path_under(self.root, "colbert_vectors", check_name(dense_asset_name, "model"),
                          check_name(collection) + ".arrow")

    # -- side files of the reranked stage (caches, not assets) ---------------------------------

    def retrieval_cache_file(self, kind: str, model_asset_name: str, collection: str) -> Path:
        if kind not in RETRIEVAL_CACHE_KINDS:
            raise ValueError(f"unknown retrieval cache kind {kind!r}")
        return path_under(self.root, "reranked", CACHE_DIR, kind, check_name(model_asset_name, "model"),
                          check_name(collection) + ".parquet")

    def ranking_state_dir(self) -> Path:
        return path_under(self.root, "state", "ranking")

    def ranking_state_file(self, collection: str) -> Path:
        """What the reranked stage chose for a collection (rag_clean.retrieval.ranking_state): search ranks with it."""
        return self.ranking_state_dir() / (check_name(collection) + ".json")

    def export_line_index(self, collection: str, file_kind: str) -> Path:
        """Where the previous export's JSONL lines start and end (exports reuse them); under the storage
        root, not the export folder, so a shared export holds only the old embedder's files."""
        return path_under(self.root, "state", "export_lines", check_name(collection),
                          check_name(file_kind, "export file kind") + ".parquet")

    # -- the vector index sink -----------------------------------------------------------------

    def index_dir(self, collection: str) -> Path:
        """The embedded (Qdrant Edge) index of a collection: one shard folder."""
        return path_under(self.root, "vector_index", EDGE_DIR, check_name(collection))

    # -- telemetry and state -------------------------------------------------------------------

    def telemetry_dir(self, collection: str) -> Path:
        return path_under(self.root, "telemetry", check_name(collection))

    def summary_file(self, collection: str) -> Path:
        return self.telemetry_dir(collection) / "processing_summary.json"

    def events_file(self, collection: str) -> Path:
        return self.telemetry_dir(collection) / "events.jsonl"

    def token_cache_file(self, collection: str, fingerprint: str) -> Path:
        """Token ids of a collection's chunks for one tokenizer (rag_clean.encoders.token_cache)."""
        return path_under(self.root, "state", "token_ids", check_name(collection), check_name(fingerprint, "tokenizer") + ".arrow")

    def budget_store_file(self) -> Path:
        return path_under(self.root, "state", "token_budgets.json")

    def weights_digest_file(self) -> Path:
        """sha256 of model files by (path, size, mtime_ns), so fingerprints do not re-hash weights."""
        return path_under(self.root, "state", "weights_digests.json")

    def folder_hash_cache_file(self, collection: str) -> Path:
        """(path, size, mtime_ns) -> sha256 of a collection's files, for its folder version (rag_clean.chunking.folder_version)."""
        return path_under(self.root, "state", "folder_hashes", check_name(collection) + ".json")

    # -- exports -------------------------------------------------------------------------------

    def export_root(self, export_dir: str = "") -> Path:
        """The export_dir setting, else <root>/exports. (Per-collection folders go below it.)"""
        return Path(export_dir).expanduser().resolve() if export_dir else path_under(self.root, "exports")
