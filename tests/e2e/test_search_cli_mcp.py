"""`rag-clean search` (a subprocess, --json parsed) and `rag-clean mcp` (spawned over stdio by the official
`mcp` SDK's own client) on the sample materialized with the tiny models: both give what the Searcher gives."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import pytest

from project_env import project_env

from rag_clean.config.settings import EmbedderSettings
from rag_clean.search import Searcher

pytestmark = pytest.mark.e2e

QUERY = "Which settings control how many packs are uploaded in parallel?"


@pytest.fixture(scope="module")
def env(searchable_sample):
    # project_env puts the storage root at <root>/storage: the sample's own.
    return project_env(searchable_sample.storage_root.parent, searchable_sample.registry_path,
                       searchable_sample.data_root)


@pytest.fixture(scope="module")
def expected(searchable_sample) -> list[dict]:
    with Searcher("sample", storage_root=searchable_sample.storage_root, registry=str(searchable_sample.registry_path),
                  settings=EmbedderSettings()) as s:
        return [r.to_dict() for r in s.search(QUERY, k=5)]


def _cli(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rag_clean_assets.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_search_json_is_the_searchers_results(env, expected):
    done = _cli(env, "search", "--collection", "sample", QUERY, "-k", "5", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert out["collection"] == "sample" and out["warnings"] == []
    assert [r["chunk_id"] for r in out["results"]] == [r["chunk_id"] for r in expected]
    for got, want in zip(out["results"], expected):
        assert set(got) == {"chunk_id", "score", "rerank_score", "text", "heading", "source_file"}
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        assert got["rerank_score"] == pytest.approx(want["rerank_score"], abs=1e-5)
    assert QUERY not in done.stdout and QUERY not in done.stderr

    plain = _cli(env, "search", "--collection", "sample", QUERY, "-k", "2", "--no-rerank")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0].startswith("  1. ") and "rerank" not in plain.stdout


def test_search_errors_are_one_line_with_status_2(env):
    done = _cli(env, "search", "--collection", "absent", QUERY)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no ranking state" in lines[0] and "materialize `reranked`" in lines[0]
    assert QUERY not in done.stderr


def test_mcp_server_over_stdio_with_the_sdk_client(env, expected, tmp_path):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=sys.executable, args=["-m", "rag_clean_assets.cli", "mcp"], env=env)

    async def talk():
        with anyio.fail_after(300):
            return await _session()

    async def _session():
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            listed = await session.call_tool("list_collections", {})
            found = await session.call_tool("search", {"collection": "sample", "query": QUERY, "k": 5})
            bad = await session.call_tool("search", {"collection": "absent", "query": QUERY})
            return tools, listed, found, bad

    with open(tmp_path / "server.stderr", "w", encoding="utf-8") as errlog:
        tools, listed, found, bad = anyio.run(talk)
    assert QUERY not in (tmp_path / "server.stderr").read_text(encoding="utf-8")  # the server logs no query
    assert set(tools) == {"search", "list_collections"}
    assert set(tools["search"].input_schema["properties"]) == {"collection", "query", "k", "rerank"}
    assert not listed.is_error and listed.structured_content["collections"] == ["sample"]
    assert not found.is_error
    results = found.structured_content["results"]
    assert [r["chunk_id"] for r in results] == [r["chunk_id"] for r in expected]
    assert results[0]["rerank_score"] == pytest.approx(expected[0]["rerank_score"], abs=1e-5)
    assert bad.is_error and "no ranking state" in bad.content[0].text
