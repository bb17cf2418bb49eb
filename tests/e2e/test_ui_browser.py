"""The Dagster UI in a real browser (Debian chromium driven by playwright) against dagster-webserver.

Opens the asset graph and finds every asset, opens the `demo` collection partition, launches a materialization
from the UI, waits for the run to succeed and checks the partition's metadata table. Screenshots go to the
test's tmp dir (docs/ui-*.png are copies of them).

Skips only when chromium or playwright is missing (scripts/bootstrap.sh installs both).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from ui_helpers import LOCATION_NAME, graphql, wait_for_asset_nodes

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("RAG_CLEAN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
JOB_PATH = f"/locations/{LOCATION_NAME}/jobs/embed_collection"
RUN_BUDGET_S = 180
ZOOM_OUT_STEPS = 12  # 0.05 of scale each
RUNS_QUERY = """
query { runsOrError(filter: {tags: [{key: "dagster/partition", value: "demo"}]}) {
  ... on Runs { results { runId status } } } }
"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: scripts/bootstrap.sh installs it with apt-get (needs root or sudo)")
    try:
        from playwright import sync_api
    except ImportError:
        if os.environ.get("CI"):  # CI installs the test extra: a missing playwright is a broken setup
            raise
        pytest.skip("playwright is missing: pip install -e '.[test]' (scripts/bootstrap.sh does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(browser, tmp_path):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"ui-{name}.png"
    page.screenshot(path=str(path))
    return path


def test_ui_graph_partition_launch_and_metadata(ui_server, page, tmp_path, tiny_registry_path):
    from rag_clean_assets.definitions import build_assets

    assets = build_assets(str(tiny_registry_path))
    # collection_files is a SourceAsset (one key and group), the rest AssetsDefinitions
    keys = {key.to_user_string() for a in assets for key in (a.keys if hasattr(a, "keys") else [a.key])}
    groups = sorted({group or "default" for a in assets
                     for group in ([s.group_name for s in a.specs] if hasattr(a, "specs") else [a.group_name])})
    wait_for_asset_nodes(ui_server.base, "query { assetNodes { id } }")

    # 1. The global asset graph, every group expanded (the UI collapses groups): every asset is there.
    expanded = ",".join(f"global@global:{g}" for g in groups)
    page.goto(f"{ui_server.base}/asset-groups?expanded={expanded}", wait_until="networkidle")
    nodes = page.locator("foreignObject")
    nodes.filter(has_text="chunks").first.wait_for()
    # The UI renders only the nodes inside the viewport and opens at a fixed zoom: as the graph grows, zoom
    # out (its own zoom-out button) until every asset is drawn, or the zoom stops at its minimum.
    zoom_out = page.locator("button").filter(has=page.get_by_role("img", name=re.compile("zoom.out")))
    for _ in range(ZOOM_OUT_STEPS):
        page.wait_for_timeout(500)  # let the layout settle (and the screenshot show it)
        graph_text = " ".join(nodes.all_text_contents())
        missing = [key for key in sorted(keys) if key.split("/")[-1] not in graph_text]
        if not missing:
            break
        zoom_out.first.click()
    _shot(page, tmp_path, "asset-graph")
    assert not missing, f"assets not in the graph: {missing}\n{graph_text[:2000]}"

    # 2. A collection partition of an asset.
    page.goto(ui_server.base + "/assets/chunks?view=partitions", wait_until="networkidle")
    page.get_by_text("demo", exact=True).first.click()
    page.get_by_text("Latest materialization").first.wait_for()
    _shot(page, tmp_path, "partition")

    # 3. Launch the whole graph for `demo` from the UI.
    before = {r["runId"] for r in graphql(ui_server.base, RUNS_QUERY)["runsOrError"]["results"]}
    page.goto(ui_server.base + JOB_PATH, wait_until="networkidle")
    page.get_by_role("button", name="Materialize all").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select a partition or create one").click()
    page.locator("li").filter(has=page.get_by_title("demo", exact=True)).first.click()
    page.keyboard.press("Escape")  # close the partition menu, keep the dialog
    launch = dialog.get_by_role("button", name="Launch 1 run")
    launch.wait_for()  # one partition: a plain run (a backfill would need the daemon)
    _shot(page, tmp_path, "launch-dialog")
    launch.click()

    run_id, status, deadline = None, None, time.monotonic() + RUN_BUDGET_S
    while time.monotonic() < deadline:
        new = [r for r in graphql(ui_server.base, RUNS_QUERY)["runsOrError"]["results"] if r["runId"] not in before]
        if new:
            run_id, status = new[0]["runId"], new[0]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
        time.sleep(1)
    assert run_id, f"no run launched from the UI:\n{ui_server.log.read_text()[-3000:]}"
    assert status == "SUCCESS", f"run {run_id} ended {status}"

    page.goto(f"{ui_server.base}/runs/{run_id}", wait_until="networkidle")
    page.get_by_text("Success").first.wait_for()
    _shot(page, tmp_path, "run")

    # 4. The partition's metadata table shows what the IO manager recorded.
    page.goto(ui_server.base + "/assets/chunks?view=partitions&partition=demo", wait_until="networkidle")
    metadata = page.get_by_text("Metadata", exact=True).first
    metadata.wait_for()
    page.get_by_text("rows", exact=True).first.wait_for()
    assert page.get_by_text("No metadata entries").count() == 0
    _shot(page, tmp_path, "metadata")
    print(f"screenshots in {tmp_path}")
    if os.environ.get("RAG_CLEAN_UI_SHOTS"):  # refresh docs/ screenshots on purpose only
        for name in ("asset-graph", "metadata"):
            shutil.copy(tmp_path / f"ui-{name}.png", Path(os.environ["RAG_CLEAN_UI_SHOTS"]) / f"ui-{name}.png")
