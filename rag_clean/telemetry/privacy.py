"""Query text never lands raw in telemetry or exports: it is a keyed hash, or truncated to <= 100 chars.

The hash is HMAC-SHA256 under a per-installation secret, so a stored hash cannot be confirmed by hashing
a guessed query (an unsalted sha256 could). The secret, first found of:

1. `$RAG_CLEAN_QUERY_KEY`: the key itself (tests, CI, secret managers);
2. the file `$RAG_CLEAN_QUERY_KEY_FILE`;
3. the file `$XDG_CONFIG_HOME/rag_clean/query_key` (default `~/.config/rag_clean/query_key`).

A missing key file is created on first use (random 32 bytes as hex, mode 0600, folder 0700). It is never
placed under the storage root: storage and exports are what gets shared, and the key next to them would
undo the point. The user config folder rather than $DAGSTER_HOME because the default storage root
lives inside $DAGSTER_HOME and the instance folder is often copied whole.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.settings import process_setting

MAX_QUERY_CHARS = 100
HASH_PREFIX = "hmac-sha256:"
QUERY_KEY_ENV = BY_KEY["query_key"].env
QUERY_KEY_FILE_ENV = BY_KEY["query_key_file"].env


class PrivacyError(RuntimeError):
    """The query key cannot be read or created safely."""


def query_key_file() -> Path:
    explicit = process_setting("query_key_file")
    if explicit:
        return Path(explicit).expanduser().resolve()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return (Path(config).expanduser() / "rag_clean" / "query_key").resolve()


def _refuse_under(path: Path, roots: list[Path]) -> None:
    for root in roots:
        root = root.expanduser().resolve()
        if path == root or root in path.parents:
            raise PrivacyError(f"query key file {path} is under the storage root {root}; "
                               f"set {QUERY_KEY_FILE_ENV} to a path outside it")


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            # link() fails if the file exists: concurrent first runs keep one key, the loser reads it.
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def query_key(storage_root: Path | None = None) -> bytes:
    """The HMAC key; creates the key file on first use. `storage_root`: also refuse a key file under it."""
    direct = process_setting("query_key")
    if direct:
        return direct.encode("utf-8")
    if os.environ.get(QUERY_KEY_ENV) is not None:  # set to blanks: a mistake, not "use the key file"
        raise PrivacyError(f"{QUERY_KEY_ENV} is set but empty")
    from rag_clean.config.paths import storage_root as default_storage_root  # lazy: paths reads env per call

    path = query_key_file()
    _refuse_under(path, [default_storage_root(), *([storage_root] if storage_root else [])])
    if not path.exists():
        _create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PrivacyError(f"query key file {path} is readable by others (mode {mode:o}); chmod 600 {path}")
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise PrivacyError(f"query key file {path} is empty; delete it to have a new key created")
    return key.encode("utf-8")


def query_hash(text: str, key: bytes | None = None) -> str:
    """`hmac-sha256:<16 hex>`; pass `key` when hashing many queries so the key is read once."""
    key = query_key() if key is None else key
    return HASH_PREFIX + hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def redact_query(text: str, mode: str = "hash", key: bytes | None = None) -> str:
    if mode == "truncate":
        return text[:MAX_QUERY_CHARS]
    return query_hash(text, key)
