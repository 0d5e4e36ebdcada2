"""Fixtures for flow tests: a temporary copy of the repository, Prefect's test harness, and a
real local Prefect server (``prefect server start`` on 127.0.0.1 in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.env import disable_telemetry
from tests.flows.helpers import (
    FAST_PARAMS,
    copy_repo,
    edit_params,
    free_port,
    prefect_server_command,
    wait_healthy,
)

disable_telemetry()


@pytest.fixture()
def repo_copy(tmp_path: Path) -> Path:
    """A fresh copy of the repository with fast training params."""
    root = copy_repo(tmp_path / "repo")
    edit_params(root, **FAST_PARAMS)
    return root


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's temporary test database and API server, once per session (~14 s set-up)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME; yields the API URL.

    Schedules and event triggers only run against such a server. Torn down at session end.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": "false",
    }
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        prefect_server_command(port),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(url, timeout=180, proc=proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


@pytest.fixture()
def against_server(prefect_server: str) -> Iterator[Callable[[], str]]:
    """Point this process's Prefect client at the real server for the test's duration."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield lambda: prefect_server
