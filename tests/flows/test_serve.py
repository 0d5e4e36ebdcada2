"""Schedules and drift-triggered re-initialization against a real local Prefect server.

End to end: a champion is trained (``cubeline run``), the training frames then change (a
SIMULATED illumination change), ``cubeline serve`` registers the deployments, ``cubeline drift``
finds the drift and emits ``cubeline.drift.detected``, the deployment trigger starts ``retrain``
in the serving process, and that run re-initializes (Phase 1) and registers a new version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import scipy.io

from tests.flows.helpers import edit_params

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _env(url: str, home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)}


def _cubeline(root: Path, env: dict[str, str], *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"cubeline {args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _simulate_illumination_change(root: Path) -> None:
    """SIMULATED: dim the training frames (smooth per-band gain 0.75-0.9, additive offset)."""
    for i in (1, 2, 3):
        path = root / "data" / "session" / f"abu-airport-{i}.mat"
        scene = scipy.io.loadmat(path)
        cube = scene["data"].astype(np.float64)
        t = np.linspace(0.0, 1.0, cube.shape[-1])
        cube = cube * (0.75 + 0.15 * t) + 0.03 * cube.mean(axis=(0, 1)) * (1.0 - t)
        path.unlink()
        scipy.io.savemat(path, {"data": cube, "map": scene["map"]})


@pytest.fixture()
def served(
    repo_copy: Path, prefect_server: str, tmp_path: Path
) -> Iterator[tuple[Path, dict[str, str]]]:
    edit_params(repo_copy, schedule={"drift_watch_interval_s": 86400})
    env = _env(prefect_server, tmp_path / "client-home")
    yield repo_copy, env


_T = TypeVar("_T")


def _wait(what: str, fn: Callable[[], _T | None], timeout: float, every: float = 2.0) -> _T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def test_schedules_and_drift_event_trigger_retrain(
    served: tuple[Path, dict[str, str]], against_server: Callable[[], str]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.deploy import RETRAIN_DEPLOYMENT, WATCH_DEPLOYMENT

    root, env = served
    first = _cubeline(root, env, "run", "--reason", "initial champion")
    assert "alias champion" in first

    _simulate_illumination_change(root)
    log = (root.parent / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with get_client(sync_client=True) as client:
            retrain_dep = _wait(
                "the retrain deployment",
                lambda: next(
                    (d for d in client.read_deployments() if d.name == RETRAIN_DEPLOYMENT), None
                ),
                timeout=120,
            )
            watch_dep = next(d for d in client.read_deployments() if d.name == WATCH_DEPLOYMENT)
            cron = [s.schedule for s in retrain_dep.schedules]
            assert [(c.cron, c.timezone) for c in cron] == [("0 3 * * 1", "UTC")]  # type: ignore[union-attr]
            interval = [s.schedule for s in watch_dep.schedules]
            assert [i.interval.total_seconds() for i in interval] == [86400]  # type: ignore[union-attr]
            # The server's scheduler puts the next cron slots on the calendar.
            scheduled = _wait(
                "scheduled retrain runs",
                lambda: [
                    r
                    for r in client.read_flow_runs(
                        deployment_filter=DeploymentFilter(
                            id=DeploymentFilterId(any_=[retrain_dep.id])
                        )
                    )
                    if r.state_name == "Scheduled"
                ],
                timeout=120,
            )
            first_slot = min(r.expected_start_time for r in scheduled)  # type: ignore[type-var]
            assert first_slot is not None
            assert (first_slot.weekday(), first_slot.hour, first_slot.minute) == (0, 3, 0)

            drift = _cubeline(root, env, "drift")
            assert "DRIFT" in drift and "event" in drift

            def triggered() -> Any:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain_dep.id]))
                )
                done = [
                    r
                    for r in runs
                    if str(r.parameters.get("reason", "")).startswith("drift event")
                    and r.state is not None
                    and r.state.is_final()
                ]
                return done[0] if done else None

            run = _wait("the drift-triggered retrain run", triggered, timeout=400, every=3)
            assert run.state is not None and run.state.is_completed(), run.state
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()

    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client_ml = mlflow.MlflowClient()
    runs = client_ml.search_runs(
        [client_ml.get_experiment_by_name("cubeline").experiment_id],  # type: ignore[union-attr]
        filter_string="tags.`cubeline.flow` = 'retrain'",
    )
    by_reason = {r.data.tags["cubeline.reason"]: r for r in runs}
    triggered_run = next(r for k, r in by_reason.items() if k.startswith("drift event"))
    # The drift was found again by the retrain's own check, so Phase 1 ran on the new data.
    assert triggered_run.data.tags["cubeline.init_state_reused"] == "false"
    assert triggered_run.data.metrics["drift/drifted"] == 1.0
    assert (
        triggered_run.data.tags["cubeline.init_state_hash"]
        != (by_reason["initial champion"].data.tags["cubeline.init_state_hash"])
    )
