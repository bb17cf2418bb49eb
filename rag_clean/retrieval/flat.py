"""Queries, candidate retrieval (dense, sparse, reciprocal-rank fusion) and ranking metrics."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.storage.columns import column
from rag_clean.telemetry.privacy import query_hash, query_key, redact_query

QUERIES_FILE = "queries.jsonl"
MAX_GENERATED_QUERIES = 500


class QueryFileError(ValueError):
    """queries.jsonl is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str
    gold_chunk_ids: tuple[str, ...]
    origin: str  # "file:queries.jsonl:<line>" or "heading:<source_file>"


QUERY_SCHEMA = pa.schema([
    column("query_id", pa.string(), "the query's id (from queries.jsonl, or made from its heading)"),
    column("text_hash", pa.string(), "keyed hash of the query text (the raw text is never stored; it is re-read "
                                     "from its origin)"),
    column("text_chars", pa.int32(), "length of the query text in characters"),
    column("text_display", pa.string(), "per query_text_mode: the hash, or the first 100 characters"),
    column("gold_chunk_ids", pa.list_(pa.string()), "the chunks that answer the query (recall@k, MRR count them)"),
    column("origin", pa.string(), "where the query came from: file:queries.jsonl:<line> or heading:<source_file>"),
])


def load_queries(collection_dir: Path, chunks: pa.Table) -> tuple[list[Query], str]:
    """Queries from `<collection>/queries.jsonl`, else generated from chunk headings.

    Returns (queries, source) with source "file" or "headings".
    """
    path = Path(collection_dir) / QUERIES_FILE
    if path.exists():
        return _read_query_file(path, chunks), "file"
    return heading_queries(chunks), "headings"


def chunk_rows(chunks: pa.Table, chunk_ids: Sequence[str], block_rows: int = 65536) -> np.ndarray:
    """Row of each id in `chunks` (-1 where absent). The lookup table is built over the ids asked for (few),
    and the chunk_id column is scanned block by block: memory follows the question, not the collection."""
    if not len(chunk_ids):
        return np.zeros(0, np.int64)
    wanted = pa.array(list(chunk_ids), pa.string())
    unique = pc.unique(wanted)
    row_of = np.full(len(unique), -1, np.int64)
    offset = 0
    for batch in chunks.select(["chunk_id"]).to_batches(max_chunksize=block_rows):
        hit = pc.index_in(batch.column(0).cast(pa.string()), value_set=unique).fill_null(-1)
        hit = hit.to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(hit >= 0)
        row_of[hit[rows]] = offset + rows
        offset += batch.num_rows
    return row_of[pc.index_in(wanted, value_set=unique).to_numpy(zero_copy_only=False).astype(np.int64)]


def take_column(chunks: pa.Table, name: str, rows: Sequence[int]) -> list:
    """Python values of one column at the given rows only."""
    if not len(rows):
        return []
    return chunks.column(name).take(pa.array(np.asarray(rows, np.int64))).to_pylist()


def _read_query_file(path: Path, chunks: pa.Table) -> list[Query]:
    queries, seen = [], set()
    data = path.read_bytes()
    try:
        text_of_file = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A bare UnicodeDecodeError names neither the file nor the line.
        bad_line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise QueryFileError(
            f"{path.name} line {bad_line}: not valid UTF-8 (byte {data[exc.start]:#04x} at byte {column} of the line: "
            f"{exc.reason}): save the file as UTF-8"
        ) from None
    for lineno, line in enumerate(text_of_file.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise QueryFileError(f"{path.name} line {lineno}: invalid JSON: {exc}") from exc
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise QueryFileError(f"{path.name} line {lineno}: needs a non-empty string 'text'")
        if not _is_unicode(text):  # a JSON "\\ud800" escape: hashing the query would fail later
            raise QueryFileError(f"{path.name} line {lineno}: 'text' holds a lone surrogate (a bad \\u escape)")
        qid = str(obj.get("query_id") or obj.get("id") or f"q{lineno}")
        if qid in seen:
            raise QueryFileError(f"{path.name} line {lineno}: duplicate query_id {qid!r}")
        seen.add(qid)
        gold = obj.get("gold_chunk_ids", [])
        if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold):
            raise QueryFileError(f"{path.name} line {lineno}: gold_chunk_ids must be a list of strings")
        queries.append(Query(qid, text, tuple(gold), f"file:{QUERIES_FILE}:{lineno}"))
    # Every gold id looked up at once (one hash table over the chunk ids), then the first bad line named.
    rows = iter(chunk_rows(chunks, [g for q in queries for g in q.gold_chunk_ids]).tolist())
    for q in queries:
        unknown = [g for g in q.gold_chunk_ids if next(rows) < 0]
        if unknown:
            lineno = q.origin.rsplit(":", 1)[1]
            raise QueryFileError(f"{path.name} line {lineno}: gold chunk ids not in the collection: {unknown[:3]}")
    return queries


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def heading_queries(chunks: pa.Table, limit: int = MAX_GENERATED_QUERIES, block_rows: int = 65536) -> list[Query]:
    """One query per distinct heading (the first `limit` in chunk order); its gold chunks are the chunks
    under that heading. Reads the columns block by block: memory grows with the queries, not the chunks."""
    groups: dict[str, list[str]] = {}
    origin: dict[str, str] = {}
    table = chunks.select(["heading", "chunk_id", "source_file"])
    for batch in table.to_batches(max_chunksize=block_rows):
        headings, ids, files = (batch.column(i).to_pylist() for i in range(3))
        for heading, cid, source in zip(headings, ids, files):
            text = (heading or "").strip()
            if len(text) < 3:
                continue
            if text not in groups:
                if len(groups) >= limit:
                    continue
                groups[text], origin[text] = [], source
            groups[text].append(cid)
    return [Query(f"h{i:04d}", text, tuple(gold), f"heading:{origin[text]}")
            for i, (text, gold) in enumerate(groups.items())]


# A Markdown ATX heading marker at the start of a line ("## "): only the marker goes, the line's other
# words stay. The old embedder's chunks are often one line: "## System Purpose  Docling is ..."; removing
# the whole heading line left 525 of 624 gold texts empty there.
_HEADING_MARKER = re.compile(r"^ {0,3}#{1,6}(?=[ \t]|$)[ \t]*", re.MULTILINE)


def heading_pattern(heading: str) -> re.Pattern[str]:
    """The heading as whole words, plural included ("Snapshot": "snapshots" too), case-insensitive; not
    inside longer words ("Install" leaves "installer" whole, where blanking substrings garbled the text)."""
    return re.compile(r"(?<!\w)" + re.escape(heading.strip()) + r"(?:e?s)?(?!\w)", re.IGNORECASE)


def mask_heading(text: str, heading: str) -> str:
    """A chunk's text as a generated query is scored against it: every occurrence of the heading (the
    query) blanked and Markdown heading markers removed, so no query is answered by matching its own
    words verbatim. Nothing else is removed: the text after the heading on its line stays."""
    masked = text
    if heading.strip():
        masked = heading_pattern(heading).sub(" ", masked)
    masked = _HEADING_MARKER.sub("", masked)
    masked = re.sub(r"[ \t]{2,}", " ", masked)
    return re.sub(r"\n[ \t]*(?:\n[ \t]*)+", "\n\n", masked).strip()


def masked_gold_texts(queries: Sequence[Query], chunks: pa.Table) -> dict[int, str]:
    """Row -> scoring text for the gold chunks of heading-generated queries (file queries are scored
    against the chunks as they are). Reads only those rows. A text can be empty: the chunk held nothing
    but its heading (see scoring_gold)."""
    pairs = [(q.text, cid) for q in queries if q.origin.startswith("heading:") for cid in q.gold_chunk_ids]
    rows = chunk_rows(chunks, [cid for _, cid in pairs])
    wanted = np.unique(rows[rows >= 0])
    texts = dict(zip(wanted.tolist(), take_column(chunks, "text", wanted)))
    return {int(r): mask_heading(texts[int(r)], heading) for (heading, _), r in zip(pairs, rows) if r >= 0}


@dataclass
class ScoringGold:
    """The gold rows each query is scored against, after masking.

    A gold chunk whose masked text is empty (it held only its heading) cannot be found by its content:
    it leaves the gold set, and a query left with no gold chunk is dropped from every metric and from
    tuning (never scored against an empty text), and counted."""

    rows: list[list[int]]          # per query: gold chunk rows that count
    dropped_queries: int = 0       # queries with gold chunks, all of them empty once masked
    empty_gold_chunks: int = 0     # distinct gold rows whose masked text is empty

    def to_dict(self) -> dict:
        return {"dropped_queries": self.dropped_queries, "empty_gold_chunks": self.empty_gold_chunks,
                "scored_queries": sum(1 for g in self.rows if g)}

    def warning(self, total: int) -> str | None:
        if not self.dropped_queries:
            return None
        return (f"{self.dropped_queries} of {total} generated queries dropped from the metrics: each of their gold "
                f"chunks is empty once its heading is masked ({self.empty_gold_chunks} chunks hold only a heading)")


def scoring_gold(gold_rows: Sequence[Sequence[int]], masked: dict[int, str]) -> ScoringGold:
    """Gold rows without those whose masked text is empty (`masked`: masked_gold_texts)."""
    empty = {r for r, t in masked.items() if not t}
    rows = [[r for r in g if r not in empty] for g in gold_rows]
    dropped = sum(1 for g, kept in zip(gold_rows, rows) if g and not kept)
    return ScoringGold(rows, dropped, len(empty))


def queries_table(queries: Sequence[Query], text_mode: str = "hash", storage_root: Path | None = None) -> pa.Table:
    """`storage_root`: where the table goes; the hash key file may not lie under it (privacy.query_key)."""
    key = query_key(storage_root)  # keyed hash: the same key check_queries_match uses in this instance
    return pa.table(
        {
            "query_id": [q.query_id for q in queries],
            "text_hash": [query_hash(q.text, key) for q in queries],
            "text_chars": [len(q.text) for q in queries],
            "text_display": [redact_query(q.text, text_mode, key) for q in queries],
            "gold_chunk_ids": [list(q.gold_chunk_ids) for q in queries],
            "origin": [q.origin for q in queries],
        },
        schema=QUERY_SCHEMA,
    )


def check_queries_match(queries: Sequence[Query], stored: pa.Table, storage_root: Path | None = None) -> None:
    """The reranked asset re-reads query text from its origin; it must be what `queries` recorded."""
    stored_pairs = list(zip(stored.column("query_id").to_pylist(), stored.column("text_hash").to_pylist()))
    key = query_key(storage_root)
    current = [(q.query_id, query_hash(q.text, key)) for q in queries]
    if stored_pairs != current:
        raise QueryFileError(
            "the collection's queries changed since the `queries` asset was materialized; rematerialize `queries` first"
        )


# ---------------------------------------------------------------- search

QUERY_GROUP = 32


def dense_search(query_vectors: np.ndarray, doc_vectors: np.ndarray, top_k: int,
                 block_rows: int = 65536, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k, scanning documents in blocks with a running top-k so memory stays flat
    (`doc_vectors` may be memory-mapped: one block is read at a time). `device` "cuda[:i]": the products and
    top-k run there (torch), the matrix still streams from host memory block by block."""
    if (device and str(device).startswith("cuda")) or type(doc_vectors).__module__.startswith("torch"):
        # a torch tensor (already on its device, e.g. candidates.resident_matrix) is searched where it is
        return _dense_search_torch(query_vectors, doc_vectors, top_k, block_rows,
                                   str(device) if device else str(doc_vectors.device))
    n_docs, n_q = doc_vectors.shape[0], len(query_vectors)
    k = min(top_k, n_docs)
    best_idx = np.zeros((n_q, 0), dtype=np.int64)
    best_val = np.zeros((n_q, 0), dtype=np.float32)
    for start in range(0, n_docs, block_rows):
        block = np.asarray(doc_vectors[start:start + block_rows], dtype=np.float32)
        new_idx = np.empty((n_q, min(k, len(block)) + best_idx.shape[1]), np.int64)
        new_val = np.empty(new_idx.shape, np.float32)
        # Queries in groups, so the block's score and partition temporaries stay a few MB whatever the
        # number of queries (what the flat-memory benchmark measures).
        for q0 in range(0, n_q, QUERY_GROUP):
            q1 = min(q0 + QUERY_GROUP, n_q)
            scores = query_vectors[q0:q1] @ block.T
            if scores.shape[1] > k:
                part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k:]
            else:
                part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
            new_idx[q0:q1] = np.concatenate([best_idx[q0:q1], part + start], 1)
            new_val[q0:q1] = np.concatenate([best_val[q0:q1], np.take_along_axis(scores, part, 1)], 1)
            del scores, part
        if new_idx.shape[1] > k:
            keep = np.argpartition(-new_val, k - 1, axis=1)[:, :k]
            new_idx, new_val = np.take_along_axis(new_idx, keep, 1), np.take_along_axis(new_val, keep, 1)
        best_idx, best_val = new_idx, new_val
    # Highest first, ties to the lower index.
    order = np.lexsort((best_idx, -best_val), axis=1) if n_q else np.zeros((0, 0), np.int64)
    return np.take_along_axis(best_idx, order, 1), np.take_along_axis(best_val, order, 1)


def _dense_search_torch(query_vectors, doc_vectors, top_k, block_rows, device):
    import torch

    n_docs = doc_vectors.shape[0]
    k = min(top_k, n_docs)
    q = torch.from_numpy(np.ascontiguousarray(query_vectors, dtype=np.float32)).to(device)
    best_val = torch.empty((len(q), 0), dtype=torch.float32, device=device)
    best_idx = torch.empty((len(q), 0), dtype=torch.int64, device=device)
    for start in range(0, n_docs, block_rows):
        if isinstance(doc_vectors, torch.Tensor):
            block = doc_vectors[start:start + block_rows].to(device, torch.float32)
        else:
            block = torch.from_numpy(np.ascontiguousarray(doc_vectors[start:start + block_rows], dtype=np.float32))
        scores = q @ block.to(device, non_blocking=True).T
        ids = torch.arange(start, start + len(block), device=device).expand(len(q), -1)
        val, idx = torch.cat([best_val, scores], 1), torch.cat([best_idx, ids], 1)
        best_val, pos = torch.topk(val, min(k, val.shape[1]), dim=1)
        best_idx = torch.gather(idx, 1, pos)
    # Highest first, ties to the lower index (as the CPU path): sort by index, then stable by score.
    by_idx = torch.argsort(best_idx, dim=1)
    best_val, best_idx = torch.gather(best_val, 1, by_idx), torch.gather(best_idx, 1, by_idx)
    order = torch.sort(best_val, dim=1, descending=True, stable=True).indices
    return (torch.gather(best_idx, 1, order).cpu().numpy(), torch.gather(best_val, 1, order).cpu().numpy())


class SparseIndex:
    """Inverted index over (term_ids, weights) rows: postings sorted by term."""

    def __init__(self, rows_term_ids: Sequence[np.ndarray], rows_weights: Sequence[np.ndarray]):
        self.n_docs = len(rows_term_ids)
        lengths = np.array([len(t) for t in rows_term_ids], dtype=np.int64)
        doc = np.repeat(np.arange(self.n_docs), lengths)
        terms = np.concatenate(rows_term_ids).astype(np.int64) if self.n_docs else np.zeros(0, np.int64)
        weights = np.concatenate(rows_weights).astype(np.float32) if self.n_docs else np.zeros(0, np.float32)
        self._index(doc, terms, weights)

    @classmethod
    def from_flat(cls, n_docs: int, lengths: np.ndarray, terms: np.ndarray, weights: np.ndarray) -> "SparseIndex":
        """From flat Arrow-style columns (row i owns the next lengths[i] entries): no per-row Python objects."""
        self = cls.__new__(cls)
        self.n_docs = int(n_docs)
        # int32 postings (a block has < 2**31 rows, a vocabulary < 2**31 terms): half the memory of int64.
        self._index(np.repeat(np.arange(self.n_docs, dtype=np.int32), np.asarray(lengths, np.int64)),
                    np.asarray(terms).astype(np.int32, copy=False), np.asarray(weights).astype(np.float32, copy=False))
        return self

    def _index(self, doc: np.ndarray, terms: np.ndarray, weights: np.ndarray) -> None:
        # Not a stable sort: a document has at most one posting per term, so the order within a term does
        # not change any document's sum (each adds its query terms in query order either way).
        # A vocabulary under 65,536 terms (BERT's 30,522) sorts as uint16: numpy's radix sort, linear time.
        small = len(terms) and int(terms.min()) >= 0 and int(terms.max()) < 65536
        order = np.argsort(terms.astype(np.uint16), kind="stable") if small else np.argsort(terms)
        self.terms, self.docs, self.weights = terms[order], doc[order], weights[order]

    def score_all(self, term_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Dot product of the query's term weights with every document's, float32 [n_docs]."""
        scores = np.zeros(self.n_docs, dtype=np.float32)
        term_ids = np.asarray(term_ids).astype(self.terms.dtype, copy=False)  # else numpy converts the index per call
        lo = np.searchsorted(self.terms, term_ids, "left")
        hi = np.searchsorted(self.terms, term_ids, "right")
        for a, b, w in zip(lo, hi, weights):
            np.add.at(scores, self.docs[a:b], self.weights[a:b] * w)
        return scores

    def search(self, term_ids: np.ndarray, weights: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.score_all(term_ids, weights)
        hits = np.flatnonzero(scores > 0)
        top = hits[np.argsort(-scores[hits], kind="stable")][:top_k]
        return top, scores[top]


def rrf_scores(rankings: Sequence[Sequence[int]], k: int = 60) -> dict[int, float]:
    """Reciprocal-rank-fusion score of every doc in any ranking: sum over rankings of 1 / (k + rank)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            scores[int(doc)] = scores.get(int(doc), 0.0) + 1.0 / (k + rank)
    return scores


def rrf_fuse(rankings: Sequence[Sequence[int]], k: int = 60,
             top_k: int | None = None) -> tuple[list[int], dict[int, float]]:
    """(fused ranking by RRF score, ties to the lower index; every doc's score)."""
    scores = rrf_scores(rankings, k)
    fused = sorted(scores, key=lambda d: (-scores[d], d))
    return (fused[:top_k] if top_k else fused), scores


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60, top_k: int | None = None) -> list[int]:
    """Fuse ranked lists of doc indices by RRF score."""
    return rrf_fuse(rankings, k, top_k)[0]


RERANKED_SCHEMA = pa.schema([
    column("query_id", pa.string(), "the query (queries.query_id)"),
    column("rank", pa.int32(), "final rank of the chunk for the query, 1 = best"),
    column("chunk_id", pa.string(), "the ranked chunk (chunks.chunk_id)"),
    column("retrieval_score", pa.float32(), "hybrid candidate score before reranking"),
    column("rerank_score", pa.float32(), "cross-encoder score; null where it did not score (rerank disabled, "
                                         "no reranker loaded, or beyond rerank_top_k)"),
    column("scorer", pa.string(), "what ordered the list: the cross-encoder's id, or retrieval (and why)"),
])
