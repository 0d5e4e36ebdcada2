"""The team scenario, driven from outside as a team runs it (used by a test and bench/team.py).

Real processes against a real team stack (``cubeline stack up``): two clones of the repository
join it; clone B ingests new frames (the bundled scenes with a SIMULATED illumination change) as
a second data version; clone A registers the work-pool deployments with a cron that fires within
two minutes; then ``cubeline run`` in A (bundled data) and ``cubeline run --data-version`` in B
start at once while a worker runs the scheduled retrain. Afterwards the MLflow server, the
registry, the champion history and the shared DVC remote (from a third, fresh clone) are read
back, and the stack is taken down.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.flows.helpers import FAST_PARAMS, copy_repo, edit_params, free_port
from tests.flows.loop import wait_for, write_frames

MODEL = "cubeline-channel-selector"


def stack_parent() -> Path:
    """A folder for the stack that PostgreSQL's unprivileged user can reach (pytest's tmp is 700).

    The caller removes it.
    """
    path = Path(tempfile.mkdtemp(prefix="cubeline-team-"))
    path.chmod(0o711)
    return path


def cli(root: Path, env: dict[str, str], *args: str, timeout: float = 600) -> str:
    """``cubeline ARGS`` in ``root`` (its own code); stdout, or AssertionError on failure."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"cubeline {' '.join(args)} in {root} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def clone(dst: Path) -> Path:
    """A fresh clone with the tests' fast params."""
    root = copy_repo(dst)
    edit_params(root, **FAST_PARAMS)
    return root


def _next_cron(lead_s: float = 75.0) -> tuple[str, dt.datetime]:
    """A daily cron (UTC) whose next firing is the first whole minute ``lead_s`` from now."""
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lead_s)
    at = (at + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
    return f"{at.minute} {at.hour} * * *", at


def embedded_run(work: Path) -> float:
    """Seconds of one ``cubeline run`` on the embedded defaults in a fresh clone."""
    root = clone(work / "embedded")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                "CUBELINE_MLFLOW", "CUBELINE_REG", "CUBELINE_STACK"))}
    env["PREFECT_HOME"] = str(work / "embedded-prefect-home")
    t0 = time.monotonic()
    cli(root, env, "run", "--json")
    return round(time.monotonic() - t0, 2)


def _scheduled_run(api: str, deployment: str, timeout: float) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)

        def finished() -> Any:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            done = [r for r in runs if r.auto_scheduled and r.state and r.state.is_final()]
            return done[0] if done else None

        return wait_for("the scheduled retrain on a worker", finished, timeout, every=3.0)


def scenario(
    work: Path, stack_dir: Path, *, timeout: float = 600, lone_run: bool = False
) -> dict[str, Any]:
    """Run the whole team scenario; the stack is down again when this returns or raises.

    ``lone_run`` adds, after the checks, one ``cubeline run`` alone against the stack in a fresh
    clone (phase2.seed changed, so that it trains rather than finding its model registered):
    ``seconds_team_alone``, the like-for-like figure of ``embedded_run``.

    Returns:
        Figures and facts: ``runs_recorded``, ``champions``, ``history_in_order``,
        ``restored_in_fresh_clone``, ``seconds_team``, ``stack_startup_s``, ``processes_left``,
        the reasons of the three runs, ...
    """
    import mlflow

    from flows.stack import load_state, stack_down, stack_env, stack_up
    from tasks.data_versions import restore_data_version
    from tasks.registry import champion_history
    from tasks.versioning import restore_tree

    out: dict[str, Any] = {}
    a, b = clone(work / "a"), clone(work / "b")
    frames = write_frames(_data_root(a), work / "frames", simulate_illumination=True)
    t0 = time.monotonic()
    state = stack_up(stack_dir, pg_port=free_port(), mlflow_port=free_port(),
                     prefect_port=free_port(), scheduler_loop_s=5.0)
    pids = dict(state.pids)
    try:
        out["stack_startup_s"] = round(time.monotonic() - t0, 2)
        base = {**os.environ, **stack_env(state)}
        env_a = {**base, "PREFECT_HOME": str(work / "home-a")}
        env_b = {**base, "PREFECT_HOME": str(work / "home-b")}
        cli(a, env_a, "stack", "join")
        cli(b, env_b, "stack", "join")
        version = cli(b, env_b, "ingest", *map(str, frames), "--json").strip().splitlines()[-1]
        data_version = json.loads(version)["version"]
        cron, fires_at = _next_cron()
        cli(a, env_a, "stack", "deploy", "--cron", cron)
        t1 = time.monotonic()
        procs = [
            subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for root, env, args in (
                (a, env_a, ("run", "--json", "--reason", "user A")),
                (b, env_b, ("run", "--json", "--reason", "user B", "--data-version",
                            data_version)),
            )
        ]
        seconds = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            seconds.append(round(time.monotonic() - t1, 2))
            if p.returncode != 0:
                raise AssertionError(f"cubeline run exited {p.returncode}:\n{stdout[-3000:]}\n"
                                     f"{stderr[-3000:]}")
        out["seconds_team"] = seconds[0]
        out["seconds_team_both"] = max(seconds)
        wait_s = max(0.0, (fires_at - dt.datetime.now(dt.UTC)).total_seconds())
        sched = _scheduled_run(state.prefect_api, "retrain/retrain-scheduled",
                               timeout=wait_s + timeout)
        out["scheduled_run_state"] = sched.state.type.value

        mlflow.set_tracking_uri(state.mlflow_url)
        mlflow.set_registry_uri(state.mlflow_url)
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("cubeline")
        runs = client.search_runs([exp.experiment_id] if exp else [],
                                  filter_string="tags.`cubeline.flow` = 'retrain'")
        out["runs_recorded"] = len(runs)
        out["reasons"] = sorted(r.data.tags.get("cubeline.reason", "") for r in runs)
        out["data_versions"] = sorted({r.data.tags.get("cubeline.data_hash", "") for r in runs})
        out["artifact_uris"] = sorted({r.info.artifact_uri.split(":", 1)[0] for r in runs})
        aliases = client.get_registered_model(MODEL).aliases
        history = champion_history(MODEL)
        out["versions"] = sorted(int(v.version) for v in
                                 client.search_model_versions(f"name='{MODEL}'"))
        out["champions"] = sum(1 for k in aliases if k == "champion")
        out["champion"] = str(aliases.get("champion"))
        out["history"] = [(h.seq, h.version, h.previous_version) for h in history]
        chain_ok = all(h.previous_version == p.version for p, h in itertools.pairwise(history))
        out["history_in_order"] = bool(
            history and [h.seq for h in history] == sorted(h.seq for h in history)
            and [h.at for h in history] == sorted(h.at for h in history)
            and history[0].previous_version is None and chain_ok
            and history[-1].version == out["champion"]
        )
        # A third clone, fresh, restores the new data version and the champion's Phase-1 state
        # from the shared remote alone.
        c = copy_repo(work / "c")
        cli(c, {**base, "PREFECT_HOME": str(work / "home-c")}, "stack", "join")
        champ = client.get_model_version_by_alias(MODEL, "champion")
        init_hash = client.get_run(str(champ.run_id)).data.tags["cubeline.init_state_hash"]
        info = restore_data_version(data_version, root=c, remote="local",
                                    versions_dir=c / "outputs" / "data_versions")
        restore_tree(init_hash, root=c, remote="local", target=c / "outputs" / "restored-state",
                     what="initialization state")
        out["restored_in_fresh_clone"] = bool(
            info.path.is_dir() and any((c / "outputs" / "restored-state").iterdir()))
        if lone_run:
            e = clone(work / "e")
            edit_params(e, phase2={"seed": 43})
            env_e = {**base, "PREFECT_HOME": str(work / "home-e")}
            cli(e, env_e, "stack", "join")
            t2 = time.monotonic()
            cli(e, env_e, "run", "--json")
            out["seconds_team_alone"] = round(time.monotonic() - t2, 2)
    finally:
        state = load_state(stack_dir)
        td = time.monotonic()
        stack_down(stack_dir)
        out["stack_down_s"] = round(time.monotonic() - td, 2)
    from flows.stack import _port_free
    from tasks.env import process_alive as _alive

    out["processes_left"] = [n for n, pid in pids.items() if _alive(pid)]
    out["ports_left"] = [p for p in (state.pg_port, state.mlflow_port, state.prefect_port)
                         if not _port_free(p)]
    return out


def _data_root(root: Path) -> Path:
    """A root whose data/session holds the bundled scenes (restored by DVC when needed)."""
    from tasks.versioning import ensure_data

    ensure_data(root)
    return root
