"""The team stack end to end: real PostgreSQL, MLflow and Prefect servers, two workers.

Marked ``stack`` (and ``slow``, ``server``): needs PostgreSQL's initdb/pg_ctl (Debian's
postgresql-15 in CI); skipped where they are missing. A few minutes on a 2-core machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.stack import StackError, find_pg_bin

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.server]


def _need_postgres() -> None:
    try:
        find_pg_bin()
    except StackError as exc:
        pytest.skip(str(exc))


def test_two_clones_and_a_worker_share_one_registry(tmp_path: Path) -> None:
    """The issue's done-when scenario: two users, two data versions, a scheduled worker run."""
    from tests.flows.team import scenario, stack_parent

    _need_postgres()
    parent = stack_parent()
    try:
        out = scenario(tmp_path, parent / "stack")
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert out["runs_recorded"] == 3, out
    assert out["scheduled_run_state"] == "COMPLETED", out
    assert len(out["data_versions"]) == 2, out  # bundled data and clone B's ingested version
    assert any(r.startswith("schedule ") for r in out["reasons"]), out["reasons"]
    assert all(any(u in r for r in out["reasons"]) for u in ("user A", "user B")), out["reasons"]
    assert out["artifact_uris"] == ["mlflow-artifacts"], out  # served by the server
    assert out["champions"] == 1 and out["champion"] in map(str, out["versions"]), out
    assert out["history_in_order"], out["history"]
    assert out["restored_in_fresh_clone"], out
    assert out["processes_left"] == [] and out["ports_left"] == [], out
