"""The worker process of chunking.jsonl_pool: parses and token-counts the byte ranges of a JSONL file it is
sent, with the in-process reader's code (readers.iter_jsonl), and answers each with Arrow IPC rows, skips and
record count (protocol in jsonl_pool's docstring). Kept out of the package's imports so `python -m` runs it
cleanly.

    python -m rag_clean.chunking.jsonl_worker    (started by jsonl_pool.JsonlReader only)
"""

from __future__ import annotations

import sys
from typing import BinaryIO

import pyarrow as pa

from rag_clean.workers import error_line, ipc_bytes, receive_frame, send_frame, worker_streams

from .config import ChunkingError, SkipRecord
from .readers import JsonlPosition, iter_jsonl, jsonl_file_lines
from .rows import CHUNK_SCHEMA
from .tokens import counter_from


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    """The worker's loop (see the module docstring)."""
    message = receive_frame(stdin)
    if message is None:
        return 1
    header, body = message
    count = counter_from(header["counter"], body)
    while (message := receive_frame(stdin)) is not None:
        request = message[0]
        rel = request["rel"]
        try:
            skipped: list[SkipRecord] = []
            position = JsonlPosition()
            lines = jsonl_file_lines(request["path"], rel, request["start"], request["end"], request["first_line"])
            rows = [row for row, _ in iter_jsonl(lines, rel, count, skipped, position)]
            reply = {"ok": True, "records": position.records, "skips": [[s.index, s.reason] for s in skipped]}
            send_frame(stdout, reply, ipc_bytes(pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)) if rows else b"")
        except ChunkingError as exc:
            send_frame(stdout, {"ok": False, "chunking": True, "error": str(exc)})
        except Exception as exc:  # a bug or a full memory: one line back; the parent names the file and range
            send_frame(stdout, {"ok": False, "error": error_line(exc)})
    return 0


if __name__ == "__main__":
    sys.exit(serve(*worker_streams()))
