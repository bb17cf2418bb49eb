"""Query privacy: the stored hash is keyed (HMAC-SHA256, secret outside the storage root), not a bare sha256."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat

import pyarrow as pa
import pytest

from rag_clean.telemetry import privacy
from rag_clean.telemetry.privacy import PrivacyError, query_hash, query_key, redact_query
from rag_clean.retrieval.flat import QueryFileError, check_queries_match, load_queries, queries_table

TEXT = "how do I install the driver"


@pytest.fixture
def key_env(monkeypatch, tmp_path):
    """No key from the session defaults: each test says where its key comes from."""
    for var in (privacy.QUERY_KEY_ENV, privacy.QUERY_KEY_FILE_ENV, "RAG_CLEAN_STORAGE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return monkeypatch


def test_hash_is_keyed_not_a_guessable_sha256(key_env):
    key_env.setenv(privacy.QUERY_KEY_ENV, "k1")
    digest = query_hash(TEXT)
    plain = hashlib.sha256(TEXT.encode()).hexdigest()
    assert plain[:16] not in digest and digest != "sha256:" + plain[:16]
    assert digest == "hmac-sha256:" + hmac.new(b"k1", TEXT.encode(), hashlib.sha256).hexdigest()[:16]
    assert query_hash(TEXT) == digest  # deterministic under one key: queries and reranked agree
    assert redact_query(TEXT, "hash") == digest and redact_query(TEXT, "truncate") == TEXT[:100]


def test_two_keys_give_different_hashes(key_env):
    key_env.setenv(privacy.QUERY_KEY_ENV, "k1")
    first = query_hash(TEXT)
    key_env.setenv(privacy.QUERY_KEY_ENV, "k2")
    assert query_hash(TEXT) != first
    assert query_hash(TEXT, key=b"k1") == first


def test_key_file_created_once_0600_in_user_config_outside_storage(key_env, tmp_path):
    expected = tmp_path / "config" / "rag_clean" / "query_key"
    assert privacy.query_key_file() == expected
    key = query_key()
    assert expected.is_file() and len(key) >= 32
    assert stat.S_IMODE(expected.stat().st_mode) == 0o600
    assert stat.S_IMODE(expected.parent.stat().st_mode) == 0o700
    assert query_key() == key  # reused, not regenerated
    from rag_clean.config.paths import storage_root
    assert storage_root() not in expected.parents  # default storage root is $DAGSTER_HOME/rag_clean
    assert list((tmp_path / "config" / "rag_clean").iterdir()) == [expected]  # no temp file left behind


def test_key_file_env_and_direct_key(key_env, tmp_path):
    path = tmp_path / "secrets" / "k"
    key_env.setenv(privacy.QUERY_KEY_FILE_ENV, str(path))
    from_file = query_key()
    assert path.read_text().strip().encode() == from_file
    key_env.setenv(privacy.QUERY_KEY_ENV, "direct")
    assert query_key() == b"direct"  # the direct key wins and writes nothing
    assert not (tmp_path / "config").exists()


def test_key_file_under_the_storage_root_is_refused(key_env, tmp_path):
    storage = tmp_path / "storage"
    key_env.setenv("RAG_CLEAN_STORAGE_ROOT", str(storage))
    key_env.setenv(privacy.QUERY_KEY_FILE_ENV, str(storage / "keys" / "query_key"))
    with pytest.raises(PrivacyError, match="under the storage root"):
        query_key()
    assert not (storage / "keys").exists()
    other = tmp_path / "elsewhere"
    key_env.setenv(privacy.QUERY_KEY_FILE_ENV, str(tmp_path / "k"))
    with pytest.raises(PrivacyError, match="under the storage root"):
        query_key(storage_root=tmp_path)  # an explicit root is checked too
    assert query_key(storage_root=other)


def test_readable_or_empty_key_file_is_refused(key_env, tmp_path):
    path = tmp_path / "k"
    key_env.setenv(privacy.QUERY_KEY_FILE_ENV, str(path))
    path.write_text("secret\n")
    os.chmod(path, 0o644)
    with pytest.raises(PrivacyError, match="chmod 600"):
        query_key()
    os.chmod(path, 0o600)
    path.write_text("")
    with pytest.raises(PrivacyError, match="is empty"):
        query_key()
    key_env.setenv(privacy.QUERY_KEY_ENV, "")
    with pytest.raises(PrivacyError, match="RAG_CLEAN_QUERY_KEY is set but empty"):
        query_key()


def _chunks() -> pa.Table:
    return pa.table({"chunk_id": ["c0"], "heading": ["x heading"], "source_file": ["a.md"]})


def test_queries_table_and_check_use_the_same_keyed_hash(key_env, tmp_path):
    key_env.setenv(privacy.QUERY_KEY_ENV, "instance-key")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"query_id": "q1", "text": TEXT}) + "\n")
    queries, _ = load_queries(tmp_path, _chunks())
    table = queries_table(queries, "hash")
    assert table.column("text_hash").to_pylist() == [query_hash(TEXT)]
    assert table.column("text_display").to_pylist() == [query_hash(TEXT)]
    assert hashlib.sha256(TEXT.encode()).hexdigest()[:16] not in str(table.to_pylist())
    check_queries_match(queries, table)  # same instance key: the reranked asset agrees
    key_env.setenv(privacy.QUERY_KEY_ENV, "another-instance")
    with pytest.raises(QueryFileError, match="rematerialize `queries` first"):
        check_queries_match(queries, table)
