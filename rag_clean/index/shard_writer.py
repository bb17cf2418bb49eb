"""Shard writer processes: one per Edge shard, so a big sync converts and writes points on several cores
(Edge's Python API holds the GIL while it converts a point; see rag_clean.index.qdrant_edge).

The parent (`ShardWriterPool`, in the vector_index step) splits each block of the sync by shard and hands
each part to that shard's process as Arrow IPC bytes; the process applies it with the same code as an
in-process write (rag_clean.index.blocks.apply_block). No pickle: the protocol is rag_clean.workers frames (a
JSON header, then optional Arrow bytes), requests on the child's stdin, one reply frame each on its stdout:

    {"op": "open", "path", "collection", "spec"}   load the shard
    {"op": "write"} + Arrow IPC stream              -> {"ok": true, "upserted": n, "rewritten": {...}}
    {"op": "delete", "ids": [...]}                  point ids
    {"op": "commit"}                                flush + build the HNSW graph
    {"op": "close"}                                 then the process exits

A failure answers {"ok": false, "error": "..."} and ends the process; a process that dies (a SIGBUS on a full
disk) is reported with its shard's folder. Each part a process has not answered stays queued (at most
QUEUE_PARTS), which bounds the parent's memory and makes a slow shard hold the sync back, not grow a backlog.

    python -m rag_clean.index.shard_writer    (started by ShardWriterPool only)
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Sequence

import pyarrow as pa

from rag_clean.index.base import VectorIndexError, point_id
from rag_clean.index.blocks import BlockCounts, BlockSpec, apply_block
from rag_clean.index.qdrant_edge import route
from rag_clean.workers import error_line, ipc_bytes, ipc_table, receive_frame, send_frame, start_worker, worker_streams

QUEUE_PARTS = 2


class _ShardTarget:
    """One shard as the upsert / update_vectors target of apply_block (point ids from the collection)."""

    def __init__(self, store, collection: str):
        self.store, self.collection = store, collection

    def upsert(self, points) -> None:
        self.store.upsert([point_id(self.collection, p.chunk_id) for p in points], points)

    def update_vectors(self, points) -> None:
        self.store.update_vectors([point_id(self.collection, p.chunk_id) for p in points], points)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    """The writer process's loop (see the module docstring)."""
    from rag_clean.index.edge_shard import EdgeShardStore

    store = target = spec = None
    while True:
        message = receive_frame(stdin)
        if message is None:
            return 0 if store is None else 1   # the parent went away before "close"
        header, body = message
        op = header["op"]
        try:
            reply: dict = {"ok": True}
            if op == "open":
                store = EdgeShardStore.load(Path(header["path"]))
                target, spec = _ShardTarget(store, header["collection"]), BlockSpec.from_json(header["spec"])
            elif op == "write":
                batch = ipc_table(body).combine_chunks().to_batches()[0]
                counts = apply_block(target, batch, spec)
                reply.update(upserted=counts.upserted, rewritten=counts.rewritten)
            elif op == "delete":
                store.delete(header["ids"])
            elif op == "commit":
                store.commit()
            elif op == "close":
                store.close()
                send_frame(stdout, reply)
                return 0
        except Exception as exc:  # one line back to the parent, which names the shard
            send_frame(stdout, {"ok": False, "error": error_line(exc)})
            return 1
        send_frame(stdout, reply)


class _Writer:
    """The parent's end of one writer process: a thread sends queued parts and collects the replies."""

    def __init__(self, path: Path, collection: str, spec: BlockSpec):
        self.path = path
        self.process = start_worker("rag_clean.index.shard_writer")
        self.counts = BlockCounts()
        self.error: str | None = None
        self.parts: queue.Queue = queue.Queue(QUEUE_PARTS)
        self.thread = threading.Thread(target=self._run, name=f"shard-writer-{path.name}", daemon=True)
        self.parts.put(({"op": "open", "path": str(path), "collection": collection, "spec": spec.to_json()}, b""))
        self.thread.start()

    def _run(self) -> None:
        while True:
            header, body = self.parts.get()
            if header is None:
                return
            if self.error is not None:
                continue   # drain: the parent learns of the error at its next put or at commit
            try:
                send_frame(self.process.stdin, header, body)
                message = receive_frame(self.process.stdout)
            except (BrokenPipeError, OSError):
                message = None
            if message is None:
                self.error = f"its writer process died (exit code {self.process.wait()})"
                continue
            reply = message[0]
            if not reply.get("ok"):
                self.error = reply.get("error", "unknown error")
                continue
            self.counts.add(BlockCounts(reply.get("upserted", 0), reply.get("rewritten", {})))

    def put(self, header: dict, body: bytes = b"") -> None:
        self.parts.put((header, body))

    def finish(self) -> None:
        self.parts.put((None, b""))
        self.thread.join()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class ShardWriterPool:
    """The sync's writer over several shards (same calls as blocks.InProcessWriter)."""

    def __init__(self, paths: Sequence[Path], collection: str, spec: BlockSpec, location: str):
        self.collection, self.location = collection, location
        self.writers = [_Writer(Path(p), collection, spec) for p in paths]

    def _check(self) -> None:
        for k, w in enumerate(self.writers):
            if w.error is not None:
                self.close()
                raise VectorIndexError(f"vector index {self.location}: writing shard {k} ({w.path}) failed: {w.error}")

    def delete(self, chunk_ids: Sequence[str]) -> None:
        ids = [point_id(self.collection, c) for c in chunk_ids]
        for w, members in zip(self.writers, route(ids, len(self.writers))):
            if len(members):
                w.put({"op": "delete", "ids": [ids[j] for j in members]})
        self._check()

    def write(self, batch: pa.RecordBatch) -> None:
        ids = [point_id(self.collection, c) for c in batch.column("chunk_id").to_pylist()]
        for w, members in zip(self.writers, route(ids, len(self.writers))):
            if len(members):
                w.put({"op": "write"}, ipc_bytes(batch.take(pa.array(members))))
        self._check()

    def commit(self) -> BlockCounts:
        """Every shard flushes and builds its HNSW graph (side by side); the counts of all writes."""
        for w in self.writers:
            w.put({"op": "commit"})
            w.put({"op": "close"})
        for w in self.writers:
            w.finish()
        self._check()
        for w in self.writers:
            w.process.wait()
        total = BlockCounts()
        for w in self.writers:
            total.add(w.counts)
        return total

    def close(self) -> None:
        for w in self.writers:
            w.kill()
            w.finish()


if __name__ == "__main__":
    sys.exit(serve(*worker_streams()))
