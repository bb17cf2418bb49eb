"""Query text never lands raw in telemetry or exports: it is hashed, or truncated to <= 100 chars."""

from __future__ import annotations

import hashlib

MAX_QUERY_CHARS = 100


def query_hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def redact_query(text: str, mode: str = "hash") -> str:
    if mode == "truncate":
        return text[:MAX_QUERY_CHARS]
    return query_hash(text)
