"""Tokenize once per tokenizer: token ids of a collection's chunks, shared by every model that tokenizes alike.

The default MiniLM, sre-embedding-model and SPLADE-tiny all use the bert-base-uncased WordPiece: without
this each stage tokenizes the whole collection again. The first stage that tokenizes writes the ids it
made to `layout.token_cache_file(collection, fingerprint)` (Arrow IPC, one record batch per tokenize
window, written atomically); later stages memory-map that file and read each chunk's ids by content hash.
A pass is a `TokenSource` (rag_clean.encoders.tokens) handed to the encoder: the runner reads token ids
from it, and the tokenizer is never patched.

- Key: (tokenizer fingerprint, chunk content hash). The hashes are the chunks table's `content_hash`
  column, passed in by the stage: texts are not hashed again. The fingerprint
  (rag_clean.encoders.tokenize.tokenizer_fingerprint) is the sha256 of the tokenizer's
  normalized definition (vocabulary, normalizer, pre-tokenizer, model, post-processor, decoder; its
  truncation and padding settings dropped) plus the lowercase flag: two models whose tokenizers differ
  in anything that changes ids never share a file.
- Truncation happens after the lookup: rows are stored as tokenized at the writer's max_length (`cap`,
  with a flag for rows it cut); a reader with a smaller max_length cuts them the way the tokenizer would
  (content tail dropped, the end special tokens kept: checked on a probe when a pass opens, else the
  cache is off for that tokenizer); a reader with a larger max_length re-tokenizes the rows that were cut.
- A pass with any row the file lacked (new chunks, a longer max_length) rewrites the file with that
  pass's rows; a pass that found every row writes nothing. Queries and (query, passage) pairs never
  go through it.
- `RAG_CLEAN_TOKEN_CACHE=0` turns it off.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.config.settings import process_setting
from rag_clean.encoders.base import EncoderError
from rag_clean.encoders.tokenize import Tokenizer
from rag_clean.encoders.tokens import TokenSource
from rag_clean.storage.caches import CACHE_ERRORS, discard_cache

SCHEMA = pa.schema([("content_hash", pa.string()), ("ids", pa.large_list(pa.int32())), ("cut", pa.bool_())])


def enabled() -> bool:
    return process_setting("token_cache")


def end_specials(tokenizer) -> int | None:
    """How many special tokens the tokenizer appends after the content ([SEP]: 1), found by comparing a
    truncated and an untruncated encoding of a probe; None if truncation is not 'cut the content tail'."""
    from tokenizers import Tokenizer as RustTokenizer

    full_tok = RustTokenizer.from_str(tokenizer.rust.to_str())
    full_tok.no_truncation()
    full_tok.no_padding()
    probe = " ".join(f"probe{i % 7} word" for i in range(tokenizer.max_length + 8))
    if tokenizer.lowercase:
        probe = probe.lower()
    full = full_tok.encode(probe).ids
    cut = tokenizer.rust.encode(probe).ids
    limit = tokenizer.max_length
    if len(full) <= limit or len(cut) != limit:
        return None
    for n in (1, 0, 2, 3):
        if full[:limit - n] + (full[len(full) - n:] if n else []) == cut:
            return n
    return None


class CachedTokens:
    """One open cache file, looked up by content hash in flat memory: ids, offsets and hashes stay
    memory-mapped; the index is one sorted uint64 key per row (rag_clean.storage.reuse.hash_keys), not a dict
    of every hash (~200 MB at a million rows). Rows are addressed by their row number in the file."""

    def __init__(self, path: Path):
        from rag_clean.storage.reuse import hash_keys

        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            meta = reader.schema.metadata or {}
            self.cap = int(meta.get(b"cap", b"0"))
            batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
            self.values, self.offsets, self.cut = [], [], []
            for batch in batches:
                ids = batch.column(1)
                self.offsets.append(np.frombuffer(ids.buffers()[1], dtype=np.int64, count=len(ids) + 1,
                                                  offset=ids.offset * 8))
                self.values.append(ids.values.to_numpy(zero_copy_only=True) if len(ids.values) else np.zeros(0, np.int32))
                self.cut.append(batch.column(2).to_numpy(zero_copy_only=False))
            self.hashes = pa.chunked_array([b.column(0) for b in batches], pa.string())
            self.batch_starts = np.cumsum([0] + [len(b) for b in batches])
            keys = hash_keys(self.hashes)
            self._order = np.argsort(keys, kind="stable")
            self._sorted = keys[self._order]
        except (pa.ArrowException, *CACHE_ERRORS) as exc:
            raise EncoderError(f"{path}: unreadable token cache ({exc})") from exc

    def find(self, hashes: list[str]) -> np.ndarray:
        """Row number of each hash in the file, -1 where absent (a 64-bit key match is confirmed on the
        full string, so a collision is a miss, never a wrong row)."""
        from rag_clean.storage.reuse import hash_keys

        rows = np.full(len(hashes), -1, dtype=np.int64)
        if not len(self._sorted) or not hashes:
            return rows
        keys = hash_keys(hashes)
        pos = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        hit = np.flatnonzero(self._sorted[pos] == keys)
        if len(hit):
            cand = self._order[pos[hit]]
            same = np.asarray(pc.equal(self.hashes.take(pa.array(cand)), pa.array([hashes[i] for i in hit], pa.string())))
            rows[hit[same]] = cand[same]
        return rows

    def _where(self, row: int) -> tuple[int, int]:
        b = int(np.searchsorted(self.batch_starts, row, side="right") - 1)
        return b, int(row - self.batch_starts[b])

    def ids(self, row: int) -> np.ndarray:
        b, i = self._where(row)
        off = self.offsets[b]
        return self.values[b][off[i]:off[i + 1]]

    def was_cut(self, row: int) -> bool:
        b, i = self._where(row)
        return bool(self.cut[b][i])


class TokenCachePass:
    """The cache as one encode pass over a collection's chunks sees it: lookups, and the rows to write."""

    def __init__(self, path: Path, tokenizer, n_end: int):
        self.path = path
        self.tokenizer = tokenizer
        self.n_end = n_end
        self.cached = None
        if path.exists():
            try:
                self.cached = CachedTokens(path)
            except EncoderError as exc:  # a cache: discarded with one warning, every row tokenized again
                discard_cache(path, f"unreadable token cache ({exc.__cause__ or exc})")
        self.hits = self.misses = 0
        self._pending: list[np.ndarray] = []  # file rows of all-hit windows not yet written
        self._writer = None
        self._stack = contextlib.ExitStack()

    def _from_cache(self, where: int, limit: int) -> tuple[np.ndarray, bool]:
        """A cached row as a tokenizer with max_length `limit` would give it, and whether it was cut."""
        ids = self.cached.ids(where)
        if len(ids) > limit:
            n = self.n_end
            return (np.concatenate([ids[:limit - n], ids[len(ids) - n:]]) if n else ids[:limit]), True
        return ids, self.cached.was_cut(where)

    def lookup(self, hashes: list[str], tokenize: Callable[[list[int]], tuple]) -> tuple[list[np.ndarray], np.ndarray]:
        """(id rows, cut flags bool [rows]) for the rows keyed by `hashes` (the chunks' content hashes, never
        recomputed here): cached rows where usable, `tokenize(missing positions)` -> (ids, types, cuts) for the rest."""
        limit = self.tokenizer.max_length
        id_rows: list = [None] * len(hashes)
        cut_rows = np.zeros(len(hashes), dtype=bool)
        cached_rows: list[int] = []
        missing = []
        c = self.cached
        found = c.find(hashes) if c is not None else np.full(len(hashes), -1, dtype=np.int64)
        for i, where in enumerate(found.tolist()):
            if where < 0 or (limit > c.cap and c.was_cut(where)):
                missing.append(i)
                continue
            id_rows[i], cut_rows[i] = self._from_cache(where, limit)
            cached_rows.append(where)
        if missing:
            got, _, cuts = tokenize(missing)
            for i, ids, was_cut in zip(missing, got, cuts):
                id_rows[i] = ids
                cut_rows[i] = was_cut
        self.hits += len(hashes) - len(missing)
        self.misses += len(missing)
        if self._writer is None and not missing:
            # Every row found so far: nothing to write unless a later window misses; then these rows are
            # re-read from the cached file, so only their row numbers are kept (memory stays flat).
            self._pending.append(np.asarray(cached_rows, dtype=np.int64))
        else:
            self._write(hashes, id_rows, cut_rows)
        return id_rows, cut_rows

    def _write(self, hashes, id_rows, cut_rows) -> None:
        if self._writer is None:
            from rag_clean.storage.atomic import atomic_path

            tmp = self._stack.enter_context(atomic_path(self.path))
            schema = SCHEMA.with_metadata({"cap": str(self.tokenizer.max_length),
                                           "fingerprint": self.tokenizer.fingerprint})
            self._schema = schema
            self._writer = pa.ipc.new_file(str(tmp), schema)
            limit = self.tokenizer.max_length
            for rows in self._pending:
                got = [self._from_cache(where, limit) for where in rows.tolist()]
                self._write_batch(self.cached.hashes.take(pa.array(rows)).to_pylist(), [g[0] for g in got],
                                  np.array([g[1] for g in got], dtype=bool))
            self._pending.clear()
        self._write_batch(hashes, id_rows, cut_rows)

    def _write_batch(self, hashes, id_rows, cut_rows) -> None:
        lengths = np.fromiter((len(r) for r in id_rows), dtype=np.int64, count=len(id_rows))
        offsets = np.zeros(len(id_rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(id_rows).astype(np.int32) if id_rows else np.zeros(0, np.int32)
        ids = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values, pa.int32()))
        self._writer.write_batch(pa.RecordBatch.from_arrays(
            [pa.array(hashes, pa.string()), ids, pa.array(cut_rows, pa.bool_())], schema=self._schema))

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._stack.close()  # publishes the rewrite, if there was one

    def abort(self, exc: BaseException) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._stack.__exit__(type(exc), exc, exc.__traceback__)  # removes the temp file


class TokenCache:
    """Where a collection's token caches live; `tokens(...)` is the token source of one encode pass over its chunks."""

    def __init__(self, path_for: Callable[[str], Path]):
        self.path_for = path_for  # fingerprint -> file (StorageLayout.token_cache_file, bound to a collection)
        self.last: dict | None = None  # {"file", "hits", "misses"} of the last pass that used a file

    @classmethod
    def for_collection(cls, layout, collection: str) -> "TokenCache | None":
        if not enabled():
            return None
        return cls(lambda fingerprint: layout.token_cache_file(collection, fingerprint))

    @contextlib.contextmanager
    def tokens(self, tokenizer, texts: Sequence[str], hashes: Sequence[str], stats=None) -> Iterator[TokenSource]:
        """The token source of `texts` (content hashes `hashes`) for `tokenizer`, reading and filling this
        cache; the file is rewritten when the block ends without error. A tokenizer without a fingerprint
        (slow tokenizers, pair models, a Ray encoder's absent one) gets a plain source. `stats` (EncodeStats)
        gets the pass's hits / misses."""
        n_end = end_specials(tokenizer) if isinstance(tokenizer, Tokenizer) and tokenizer.fingerprint else None
        if n_end is None:
            yield TokenSource(texts, hashes=hashes)
            return
        scope = TokenCachePass(self.path_for(tokenizer.fingerprint), tokenizer, n_end)
        try:
            yield TokenSource(texts, hashes=hashes, cache=scope)
        except BaseException as exc:
            scope.abort(exc)
            raise
        else:
            scope.finish()
        finally:
            self.last = {"file": scope.path.name, "hits": scope.hits, "misses": scope.misses}
            if stats is not None:
                stats.token_cache = dict(self.last)


def chunk_tokens(cache: "TokenCache | None", encoder, texts: Sequence[str], hashes: Sequence[str]):
    """Context manager: the token source of one encode pass of `encoder` over a collection's chunks
    (`cache.tokens` with the encoder's tokenizer and stats; a plain source without a cache)."""
    if cache is None:
        return contextlib.nullcontext(TokenSource(texts, hashes=hashes))
    return cache.tokens(getattr(encoder, "tokenizer", None), texts, hashes, getattr(encoder, "stats", None))
