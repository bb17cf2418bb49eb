"""A big JSONL file read in byte ranges on worker processes, each parsing and token-counting its ranges with
the same code as the in-process read (readers.iter_jsonl), so rows, skips and errors are the same.

Why: the in-process read is one core of Python per row (json, checks, hashing) plus the token counts; a
100k-row, 114 MiB file took 8.4 s of the chunks step on a 16-core host. Measured since: on that host the
in-process read (the Rust tokenizer already counts on every core) took 5.9 s, 16 workers 8.8 s (0.67x), and on
2 cores the workers gained 1.06x, so they are off unless `jsonl_workers` asks for them (a slower counter or a
host with slow single cores may differ). The parent cuts the file at line
ends (counting newlines, so every range knows its first line number), keeps `_IN_FLIGHT` ranges queued on
each worker, and takes the replies in file order: a range's rows come back as Arrow IPC (chunk_index counted
from the range's first record; the parent adds the records of the ranges before it), its skips as
[line, reason] pairs, its first bad line as the same ChunkingError message the in-process read gives. The
first error in file order wins, as in-process. Protocol (rag_clean.workers frames, no pickle):

    {"op": "open", "counter": {...}} + the tokenizer's JSON     once per worker (tokens.portable_counter)
    {"op": "read", "path", "rel", "start", "end", "first_line"} -> {"ok": true, "records": n, "skips": [...]}
                                                                    + Arrow IPC of the rows (none when empty)
    a failure answers {"ok": false, "error": "...", "chunking": true when it is bad input}

    python -m rag_clean.chunking.jsonl_worker    (started by JsonlReader only)
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.config.settings import process_setting
from rag_clean.processes import usable_cores
from rag_clean.workers import ipc_table, receive_frame, send_frame, start_worker

from .config import ChunkingError, SkipRecord
from .tokens import CountTokens, portable_counter

# Below this a file is read in-process. Starting the workers costs ~0.3-0.6 s; they save about the Python
# part of the read (~0.036 s per MiB, bench_chunks on the 2-core box; the tokenizer runs on every core either
# way) times (1 - 1/cores): break-even ~15 MiB on 16 cores, ~28 MiB on 2.
POOL_MIN_BYTES = 32 << 20
_RANGE_MIN, _RANGE_MAX = 1 << 20, 8 << 20  # about 4 ranges per worker within these: a slow range holds little
# back, and a worker holds one range's rows as Python objects (~50 MB at 8 MiB)
_IN_FLIGHT = 2  # ranges queued per worker, so it never waits for the parent between two


@dataclass(frozen=True)
class JsonlPlan:
    """When and how JSONL files are read on workers. `workers`: None = the `jsonl_workers` process setting
    (default 0: in-process; measured, the workers do not pay with the real tokenizer counting: see
    docs/performance.md); 0 = always in-process. `min_bytes`: smaller files are read in-process.
    `range_bytes`: None = about 4 ranges per worker, within 1-8 MiB."""

    workers: int | None = None
    min_bytes: int = POOL_MIN_BYTES
    range_bytes: int | None = None


class JsonlReader:
    """stream_collection's reader of big JSONL files (`plan` says which). Workers start at the first big
    file and serve the collection's next ones; `close()` ends them. A counter that cannot travel
    (tokens.portable_counter) means in-process reads."""

    def __init__(self, count: CountTokens, plan: JsonlPlan = JsonlPlan()):
        self._portable = portable_counter(count)
        cores = usable_cores()
        workers = plan.workers if plan.workers is not None else int(process_setting("jsonl_workers"))
        self.workers = workers if self._portable is not None else 0
        self.min_bytes, self.range_bytes = plan.min_bytes, plan.range_bytes
        self._threads = max(1, cores // max(1, self.workers))  # each worker's tokenizer threads
        self._procs: list = []

    def parallel(self, path: Path) -> bool:
        """Whether `path` is read on the workers (the one place that decides it)."""
        try:
            return self.workers > 0 and os.path.getsize(path) >= self.min_bytes
        except OSError:
            return False  # the in-process read names the file

    def _start(self) -> list:
        if not self._procs:
            header, body = self._portable
            env = {"RAYON_NUM_THREADS": str(self._threads)}
            for _ in range(self.workers):
                proc = start_worker("rag_clean.chunking.jsonl_worker", env)
                self._procs.append(proc)
                send_frame(proc.stdin, {"op": "open", "counter": header}, body)
        return self._procs

    def tables(self, path: Path, rel: str, skipped: list[SkipRecord]) -> Iterator[pa.Table]:
        """The file's rows (CHUNK_SCHEMA tables, in file order); its skips go to `skipped`."""
        try:
            yield from self._tables(path, rel, skipped)
        except BaseException:
            self.close()  # replies still in flight would answer the next file's requests
            raise

    def _tables(self, path: Path, rel: str, skipped: list[SkipRecord]) -> Iterator[pa.Table]:
        procs = self._start()
        step = self.range_bytes or min(_RANGE_MAX, max(_RANGE_MIN, os.path.getsize(path) // (4 * len(procs))))
        ranges = _line_ranges(path, rel, step)
        pending: deque = deque()
        submitted: list = []

        def submit() -> None:
            r = next(ranges, None)
            if r is not None:  # range k goes to worker k % n: each worker answers in the order it was asked
                proc = procs[len(submitted) % len(procs)]
                submitted.append(r)
                try:
                    send_frame(proc.stdin, {"op": "read", "path": str(path), "rel": rel,
                                            "start": r[0], "end": r[1], "first_line": r[2]})
                except OSError:
                    pass  # a dead worker: its missing reply says so, naming the range
                pending.append((proc, r))

        for _ in range(_IN_FLIGHT * len(procs)):
            submit()
        records = 0
        while pending:
            proc, (start, end, _) = pending.popleft()
            message = receive_frame(proc.stdout)
            if message is None:
                raise RuntimeError(f"{rel}: the JSONL worker reading bytes {start}-{end} died "
                                   f"(exit code {proc.wait()})")
            header, body = message
            if not header["ok"]:
                if header.get("chunking"):
                    raise ChunkingError(header["error"])
                raise RuntimeError(f"{rel}: the JSONL worker reading bytes {start}-{end} failed: {header['error']}")
            submit()
            skipped.extend(SkipRecord(rel, line, reason) for line, reason in header["skips"])
            if body:
                table = ipc_table(body)
                if records:
                    i = table.schema.get_field_index("chunk_index")
                    shifted = pc.add_checked(table.column(i), pa.scalar(records, pa.int32()))
                    table = table.set_column(i, table.schema.field(i), shifted)
                yield table
            records += header["records"]

    def close(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:  # end of input ends a worker; one still busy (an error cut the file short) is killed
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _line_ranges(path: Path, rel: str, step: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first line number) of ranges of about `step` bytes that end after a newline (or at the
    end of the file)."""
    try:
        with open(path, "rb") as fh:
            start, line = 0, 1
            while True:
                block = fh.read(step)
                if not block:
                    return
                if not block.endswith(b"\n"):
                    block += fh.readline()  # the rest of the line (or of the file)
                yield start, start + len(block), line
                start += len(block)
                line += block.count(b"\n")
    except OSError as exc:
        raise ChunkingError(f"{rel}: cannot be read: {exc.strerror or exc}") from exc
