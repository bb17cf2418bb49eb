"""Session fixtures of the e2e tests: one dagster-webserver shared by the GraphQL and browser tests."""

from __future__ import annotations

import pytest

from ui_helpers import UiServer, start_ui_server


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory, tiny_registry_path) -> UiServer:
    yield from start_ui_server(tmp_path_factory, tiny_registry_path)
