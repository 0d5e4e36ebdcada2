"""The retraining loop end to end against a real local Prefect server, as an operator runs it.

A champion is trained (``cubeline run``); ``cubeline serve`` serves the deployments and
``cubeline serve-model`` the champion. New frames that do not drift are ingested and checked:
nothing is triggered. New frames with a SIMULATED illumination change are ingested and checked:
``drift_watch`` emits ``cubeline.drift.detected`` naming their data version, the deployment
trigger starts ``retrain`` on exactly that version, Phase 1 re-fits on it, the gate decides, and
when it promotes, the served model answers with the new version within seconds.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.flows.helpers import edit_params, free_port
from tests.flows.loop import (
    background,
    cubeline,
    cubeline_env,
    health,
    retrain_runs,
    triggered_runs,
    wait_for,
    write_frames,
)

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _deployments() -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


def test_drift_triggered_reinitialization_closes_the_loop(
    repo_copy: Path, prefect_server: str, against_server: Callable[[], str], tmp_path: Path
) -> None:
    import mlflow

    from flows.deploy import RETRAIN_DEPLOYMENT, WATCH_DEPLOYMENT
    from tasks.serving import score_remote

    root = repo_copy
    # drift_watch every 60 s: its scheduled runs (empty inbox) show how a schedule is recorded.
    edit_params(root, schedule={"drift_watch_interval_s": 60})
    env = cubeline_env(prefect_server, tmp_path / "client-home")
    first = cubeline(root, env, "run", "--reason", "initial champion")
    assert "alias champion" in first and "/runs/flow-run/" in first  # the flow run's UI page

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        # Both must end within seconds of SIGTERM, no process left behind (see background()).
        background(root, env, tmp_path / "serve.log", "serve", stop=signal.SIGTERM) as _,
        background(root, env, tmp_path / "model.log", "serve-model", "--port", str(port),
                   "--poll-s", "1", stop=signal.SIGTERM) as _,
    ):
        deps = wait_for("the deployments", lambda: (
            d if {RETRAIN_DEPLOYMENT, WATCH_DEPLOYMENT} <= set(d := _deployments()) else None
        ), timeout=180)
        retrain_dep = deps[RETRAIN_DEPLOYMENT]
        served = wait_for("serve-model", lambda: health(url), timeout=120)
        assert served["version"] == "1"
        cube = np.zeros((1, 20, 20, 205), np.float32) + 0.1
        version, out = score_remote(url, cube)
        assert version == "1" and out["scores"].shape == (1, 20, 20)

        # Frames that did not drift: ingested and checked, nothing triggered.
        same = write_frames(root, tmp_path / "same", simulate_illumination=False)
        quiet = cubeline(root, env, "drift", *map(str, same))
        assert "no drift" in quiet and "event" not in quiet.split("drift:")[1]

        # Frames with a SIMULATED illumination change: the loop runs.
        dim = write_frames(root, tmp_path / "dim", simulate_illumination=True)
        out_drift = cubeline(root, env, "drift", *map(str, dim))
        assert "DRIFT" in out_drift and "cubeline.drift.detected" in out_drift
        data_version = out_drift.split("ingested as data version ")[1].split()[0]

        def done() -> Any:
            runs = [r for r in triggered_runs(retrain_dep.id) if r.state and r.state.is_final()]
            return runs[0] if runs else None

        run = wait_for("the drift-triggered retrain", done, timeout=500, every=3)
        assert run.state is not None and run.state.is_completed(), run.state
        assert run.parameters["data_version"] == data_version
        # Only the drifted frames triggered a run.
        assert len(triggered_runs(retrain_dep.id)) == 1
        assert not [r for r in retrain_runs(retrain_dep.id) if r.state_name == "Running"]

        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        mlflow.set_registry_uri(f"sqlite:///{root / 'mlflow.db'}")
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("cubeline")
        assert exp is not None
        runs = client.search_runs(
            [exp.experiment_id], filter_string="tags.`cubeline.trigger` = 'drift event'"
        )
        assert len(runs) == 1
        tags = runs[0].data.tags
        event_id = str(run.parameters["event_id"])
        assert tags["cubeline.reason"] == f"drift event {event_id} on data {data_version}"
        assert tags["cubeline.data_hash"] == tags["cubeline.data_version"] == data_version
        assert tags["cubeline.init_state_reused"] == "false"  # Phase 1 re-fitted on the new data
        assert runs[0].data.metrics["drift/drifted"] == 1.0
        assert "simulated-dim-abu-urban-5.mat#0" in tags["cubeline.data_split"]

        mv = client.search_model_versions(
            f"name = 'cubeline-channel-selector' and run_id = '{runs[0].info.run_id}'"
        )[0]
        champion = client.get_model_version_by_alias("cubeline-channel-selector", "champion")
        promoted = str(champion.version) == str(mv.version)
        assert mv.tags["cubeline.decision"] == ("champion" if promoted else "challenger")
        if promoted:
            wait_for("the served model to switch", lambda: (
                (h := health(url)) is not None and h["version"] == str(mv.version)
            ), timeout=30)
            version, _ = score_remote(url, cube)
            assert version == str(mv.version)
        # The champion history (cubeline history) says why, with the event.
        hist = cubeline(root, env, "history")
        if promoted:
            assert f"drift event {event_id} on data {data_version}" in hist

        # A deployment run someone asked for is "manual via deployment", not a schedule.
        from prefect.deployments import run_deployment

        manual: Any = run_deployment(name=f"retrain/{RETRAIN_DEPLOYMENT}", timeout=400)
        assert manual.state is not None and manual.state.is_completed(), manual.state
        by_trigger = {
            r.data.tags.get("cubeline.trigger"): r
            for r in client.search_runs([exp.experiment_id])
        }
        assert by_trigger["manual via deployment"].data.tags["cubeline.reason"] == (
            f"manual via deployment {RETRAIN_DEPLOYMENT}"
        )
        # The server's scheduler started drift_watch: "schedule every 60 s"; its empty inbox
        # gave nothing to check and no event.
        scheduled = wait_for("a scheduled drift_watch run", lambda: client.search_runs(
            [exp.experiment_id], filter_string="tags.`cubeline.trigger` = 'schedule'"
        ), timeout=180, every=5)
        assert scheduled[0].data.tags["cubeline.reason"] == "schedule every 60 s"
        assert scheduled[0].data.tags["cubeline.flow"] == "drift_watch"
        assert "no new frames" in scheduled[0].data.tags["cubeline.outcome"]
        assert len(triggered_runs(retrain_dep.id)) == 1
    assert promoted, "the gate kept the champion that drifted data had left behind"
