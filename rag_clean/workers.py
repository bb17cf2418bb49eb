"""Worker processes the engine starts itself (index.shard_writer, chunking.jsonl_pool): how one is started
and the length-prefixed frames parent and worker exchange on its stdin / stdout. No pickle: a frame is a
JSON header, then optional raw bytes (Arrow IPC, a tokenizer's JSON definition)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

import rag_clean

_HEADER = struct.Struct("<IQ")   # header bytes, body bytes


def start_worker(module: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m module` with this package importable (the parent may run from a checkout that is not
    installed), frames on its stdin / stdout, its stderr the parent's."""
    full = dict(os.environ, **(env or {}))
    package_root = str(Path(rag_clean.__file__).resolve().parents[1])
    full["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, full.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, "-m", module], env=full, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def worker_streams() -> tuple[BinaryIO, BinaryIO]:
    """In a worker's `__main__`: (frames in, frames out). The protocol keeps the real stdout; anything the
    engine prints goes to stderr instead."""
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return sys.stdin.buffer, protocol_out


def error_line(exc: BaseException) -> str:
    """A worker's failure as the one line it sends back (the parent adds which file / shard)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def send_frame(stream: BinaryIO, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    stream.write(_HEADER.pack(len(head), len(body)) + head)
    if body:
        stream.write(body)
    stream.flush()


def receive_frame(stream: BinaryIO) -> tuple[dict, bytes] | None:
    """The next frame, or None when the other end closed the stream (or died)."""
    raw = stream.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        return None
    head_len, body_len = _HEADER.unpack(raw)
    head = stream.read(head_len)
    body = stream.read(body_len) if body_len else b""
    if len(head) < head_len or len(body) < body_len:
        return None
    return json.loads(head), body


def ipc_bytes(data: pa.RecordBatch | pa.Table) -> bytes:
    """`data` as one Arrow IPC stream (a frame's body)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue().to_pybytes()


def ipc_table(body: bytes) -> pa.Table:
    return pa.ipc.open_stream(body).read_all()
