"""The team stack's services one by one: CLI up/status/down, the registry's advisory lock across
"hosts", migration of a single-user store, and flows unchanged against the stack.

Marked ``stack``: needs PostgreSQL's initdb/pg_ctl; skipped where they are missing. One stack is
started for the module (about a minute on a 2-core machine) and taken down at its end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.stack import StackError, find_pg_bin, load_state, stack_env
from tests.flows.helpers import free_port
from tests.flows.team import MODEL, cli, clone, stack_parent

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def stack_dir() -> Iterator[Path]:
    """A team stack brought up with the CLI (``cubeline stack up``), down at module end."""
    try:
        find_pg_bin()
    except StackError as exc:
        pytest.skip(str(exc))
    parent = stack_parent()
    path = parent / "stack"
    env = {**os.environ, "PREFECT_HOME": str(parent / "cli-home")}
    repo = Path(__file__).resolve().parents[2]
    try:
        out = cli(repo, env, "stack", "up", "--dir", str(path), "--pg-port", str(free_port()),
                  "--mlflow-port", str(free_port()), "--prefect-port", str(free_port()))
        assert "export the environment" in out and "***" in out
        state = load_state(path)
        assert state.admin_password not in out and state.lock_password not in out
        yield path
    finally:
        try:
            if (path / "stack.json").is_file():
                state = load_state(path)
                pids = dict(state.pids)
                down = cli(repo, env, "stack", "down", "--dir", str(path))
                assert "postgresql" in down
                from tasks.env import process_alive as _alive

                assert not [p for p in pids.values() if _alive(p)]
        finally:
            shutil.rmtree(parent, ignore_errors=True)


def test_status_secrets_and_loopback(stack_dir: Path) -> None:
    import psutil

    repo = Path(__file__).resolve().parents[2]
    status = json.loads(cli(repo, dict(os.environ), "stack", "status", "--dir", str(stack_dir),
                            "--json"))
    assert status["up"] and set(status["services"]) == {
        "postgresql", "mlflow", "prefect", "worker-1", "worker-2"}
    for name in ("stack.json", "stack.env"):
        assert (stack_dir / name).stat().st_mode & 0o777 == 0o600
    state = load_state(stack_dir)
    ports = {state.pg_port, state.mlflow_port, state.prefect_port}
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
    assert {c.laddr.port for c in listening} == ports
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    # A second `up` on a running stack is refused with the fix.
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "stack", "up", "--dir",
                           str(stack_dir)], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2 and "already" in proc.stderr and "stack down" in proc.stderr


_HOLD = """
import sys, time, os
from tasks.registry import RegistryError
from tasks.registry.lock import _registry_lock
t0 = time.monotonic()
try:
    with _registry_lock(float(sys.argv[2])):
        print("got", round(time.monotonic() - t0, 2), flush=True)
        time.sleep(float(sys.argv[1]))
except RegistryError as exc:
    print("refused", exc, flush=True)
"""


def _hold(env: dict[str, str], hold_s: float, timeout_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _HOLD, str(hold_s), str(timeout_s)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_registry_lock_spans_hosts(stack_dir: Path, tmp_path: Path) -> None:
    """Two processes with separate temp dirs (what two hosts see): only the PostgreSQL advisory
    lock excludes them; a killed holder frees it."""
    state = load_state(stack_dir)
    hosts = []
    for name in ("host1", "host2"):
        (tmp_path / name).mkdir()
        hosts.append({**os.environ, **stack_env(state), "TMPDIR": str(tmp_path / name)})
    first = _hold(hosts[0], 30, 10)
    assert first.stdout is not None
    assert first.stdout.readline().startswith("got")
    second = _hold(hosts[1], 0, 1.5)
    out, err = second.communicate(timeout=60)
    assert out.startswith("refused") and "advisory lock" in out and "cubeline registry lock" \
        in out, out + err
    # The file lock alone (variable unset, an HTTP registry) would not have excluded them.
    file_only = {k: v for k, v in hosts[1].items() if k != "CUBELINE_REGISTRY_LOCK_URI"}
    out, err = _hold(file_only, 0, 1.5).communicate(timeout=60)
    assert out.startswith("got"), out + err
    # SIGKILL the holder: the server drops its session's lock.
    first.kill()
    first.wait(timeout=30)
    t0 = time.monotonic()
    out, err = _hold(hosts[1], 0, 30).communicate(timeout=60)
    assert out.startswith("got") and time.monotonic() - t0 < 30, out + err
    # A lock database that does not answer: a clear error naming the variable and the fix.
    down = {**hosts[1], "CUBELINE_REGISTRY_LOCK_URI":
            f"postgresql://registry_lock:x@127.0.0.1:{free_port()}/mlflow"}
    out, err = _hold(down, 0, 1).communicate(timeout=60)
    assert out.startswith("refused") and "CUBELINE_REGISTRY_LOCK_URI" in out \
        and "cubeline stack up" in out and ":x@" not in out, out + err


def test_migrate_then_flows_unchanged(stack_dir: Path, tmp_path: Path) -> None:
    """A single-user store with two versions and a three-entry champion history moves onto the
    stack; history, promote/rollback and predict then work against it, from the same clone."""
    state = load_state(stack_dir)
    root = clone(tmp_path / "solo")
    solo = {k: v for k, v in os.environ.items() if k not in stack_env(state)}
    solo["PREFECT_HOME"] = str(tmp_path / "solo-home")
    cli(root, solo, "run", "--json")
    info = json.loads(cli(root, solo, "ingest", *(str(p) for p in sorted(
        (root / "data" / "session").glob("*.mat"))), "--train", "0", "1", "--val", "2",
        "--test", "3", "4", "--json").strip().splitlines()[-1])
    cli(root, solo, "run", "--json", "--data-version", info["version"])
    from tasks.migrate import store_summary

    solo_store = store_summary(f"sqlite:///{root / 'mlflow.db'}")["models"][MODEL]
    assert solo_store["versions"] == [1, 2], solo_store
    # A manual promotion of the version that is not champion, then a rollback: 3+ entries.
    other = "1" if solo_store["aliases"]["champion"] == "2" else "2"
    cli(root, solo, "promote", "--version", other, "--reason", "by hand")
    cli(root, solo, "rollback", "--reason", "back")
    before = cli(root, solo, "history")

    team = {**os.environ, **stack_env(state), "PREFECT_HOME": str(tmp_path / "team-home")}
    out = json.loads(cli(root, team, "stack", "migrate", "--json").strip().splitlines()[-1])
    models = out["summary"]["models"]
    assert models[MODEL]["versions"] == [1, 2]
    history = models[MODEL]["history"]
    assert [h["action"] for h in history][-2:] == ["manual", "rollback"] and len(history) >= 3
    assert models[MODEL]["aliases"]["champion"] == history[-1]["version"]
    assert out["champions_downloaded"] == [f"{MODEL}@champion"]
    assert out["files_uploaded"] > 0
    assert out["dvc_objects_copied"] > 0  # Phase-1 states and data, into the shared remote
    # The same commands, now on the server: the history reads the same.
    assert cli(root, team, "history") == before
    # The migrated artifacts moved: every run's location is served by the server.
    import mlflow

    mlflow.set_tracking_uri(state.mlflow_url)
    runs = mlflow.search_runs(experiment_names=["cubeline"], output_format="list")
    assert runs and all(r.info.artifact_uri.startswith("mlflow-artifacts:/migrated/")
                        for r in runs)
    assert not any(state.artifacts.glob("*.db"))
    predicted = cli(root, team, "predict", str(root / "data" / "session" / "abu-urban-5.mat"),
                    "--out", str(tmp_path / "pred"))
    champion = history[-1]["version"]
    assert f"(version {champion}, alias champion)" in predicted, predicted
    cli(root, team, "promote", "--version", other, "--reason", "after the move")
    assert "after the move" in cli(root, team, "history")
    cli(root, team, "rollback", "--reason", "undo on the server")
    after = store_summary(state.mlflow_url)["models"][MODEL]
    assert after["aliases"]["champion"] == champion
    assert [h["action"] for h in after["history"]][-2:] == ["manual", "rollback"]
    assert len(after["history"]) == len(history) + 2
    # A second migration onto a store that is no longer empty is refused, naming the fix.
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "stack", "migrate"], cwd=root,
                          env=team, capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr, proc.stderr


def test_drift_trigger_runs_on_a_worker(stack_dir: Path, tmp_path: Path) -> None:
    """A clone that joins after the migration: the migrated champion's Phase-1 state comes from
    the shared remote (copied there by `stack migrate`), `cubeline drift` on dimmed frames emits
    the event, and the deployment's trigger runs the retrain on a worker, on that data version."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.flows.loop import wait_for, write_frames

    state = load_state(stack_dir)
    if not any(state.dvc_remote.rglob("*")):
        pytest.skip("needs the migrated champion of test_migrate_then_flows_unchanged")
    root = clone(tmp_path / "d")
    env = {**os.environ, **stack_env(state), "PREFECT_HOME": str(tmp_path / "home-d")}
    cli(root, env, "stack", "join")
    assert "retrain/retrain-scheduled" in cli(root, env, "stack", "deploy")
    dim = write_frames(root, tmp_path / "dim", simulate_illumination=True)
    out = cli(root, env, "drift", *map(str, dim))
    assert "DRIFT" in out and "cubeline.drift.detected" in out, out
    data_version = out.split("ingested as data version ")[1].split()[0]

    with temporary_settings({PREFECT_API_URL: state.prefect_api}), \
            get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/retrain-scheduled")

        def done() -> Any:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            ended = [r for r in runs if r.parameters.get("event_id") and r.state
                     and r.state.is_final()]
            return ended[0] if ended else None

        run = wait_for("the drift-triggered retrain on a worker", done, timeout=500,
                               every=3)
    assert run.state.is_completed(), run
    mlflow.set_tracking_uri(state.mlflow_url)
    runs = mlflow.search_runs(experiment_names=["cubeline"], output_format="list",
                              filter_string="tags.`cubeline.trigger` = 'drift event'")
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["cubeline.reason"].startswith("drift event ")
    assert tags["cubeline.data_hash"] == data_version
