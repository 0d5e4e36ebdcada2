"""Kills at several points: no process outlives the command, no run stays RUNNING, no version
is left without a decision, and SIGTERM ends a run cleanly with one line (slow: real runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.helpers import (
    MARK_ENV,
    assert_clean_failure,
    marked_processes,
    run_states,
    tree,
    undecided_versions,
)

#: Where a run may write: its run folder and checkpoints (outputs/), the stores, restored data,
#: and the content-addressed Phase-1 state it pushes to the DVC remote.
ALLOWED = ("outputs/", "mlartifacts/", "mlflow.db", ".prefect/", ".dvc/", "data/",
           "dvc-remote/files/md5/")

pytestmark = pytest.mark.slow


def _cubeline(repo: Path, *argv: str, fault: str = "", timeout: float = 300
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, MARK_ENV: str(repo), "CUBELINE_FAULT": fault}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CUBELINE_MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _no_orphans(repo: Path, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while marked_processes(str(repo)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(str(repo)) == [], "processes outlived the command"


@pytest.mark.parametrize("fault", ["phase1:kill", "phase2_epoch0:kill", "register:kill"])
def test_sigkill_leaves_no_process_and_next_command_closes_the_run(repo: Path, fault: str
                                                                   ) -> None:
    before = tree(repo)
    proc = _cubeline(repo, "run", fault=fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _no_orphans(repo)
    stray = sorted(p for p in tree(repo) - before if not p.startswith(ALLOWED))
    assert stray == [], stray
    assert run_states(repo).get("RUNNING", 0) == 1  # the dead run, until a command opens the store
    after = _cubeline(repo, "history")
    assert "Traceback" not in after.stderr
    states = run_states(repo)
    assert "RUNNING" not in states and states.get("KILLED") == 1, states
    assert undecided_versions(repo) == []
    _no_orphans(repo)


@pytest.mark.parametrize("fault", ["phase2_epoch0:term", "phase1:int"])
def test_sigterm_and_sigint_end_the_run_cleanly(repo: Path, fault: str) -> None:
    start = time.monotonic()
    proc = _cubeline(repo, "train", fault=fault)
    assert_clean_failure(proc.returncode, proc.stderr, "train", 130, "interrupted")
    assert time.monotonic() - start < 120
    _no_orphans(repo)
    states = run_states(repo)
    assert "RUNNING" not in states and states.get("KILLED") == 1, states
    assert undecided_versions(repo) == []


def test_watchdog_stops_a_child_when_the_parent_is_killed(tmp_path: Path) -> None:
    mark = str(tmp_path)
    script = (
        "import subprocess, sys, time\n"
        "from tasks.lifecycle import guard_child\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "guard_child(child.pid)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, MARK_ENV: mark}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2])
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert child in marked_processes(mark)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked_processes(mark) == []


def _test_metrics(proc: subprocess.CompletedProcess[str]) -> dict[str, float]:
    import json

    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: round(float(v), 6) for k, v in summary["evaluation"]["metrics"].items()}


def test_phase2_resumes_to_the_same_metrics(repo: Path, prepared_repo: Path,
                                            tmp_path: Path) -> None:
    import shutil

    killed = _cubeline(repo, "train", fault="phase2_epoch0:kill")
    assert killed.returncode == -signal.SIGKILL
    ckpts = list((repo / "outputs" / "phase2_checkpoints").glob("*/last.ckpt"))
    assert len(ckpts) == 1
    resumed = _test_metrics(_cubeline(repo, "train", "--json"))
    assert not list((repo / "outputs" / "phase2_checkpoints").glob("*/last.ckpt"))
    fresh = tmp_path / "fresh"
    shutil.copytree(prepared_repo, fresh, symlinks=True)
    assert resumed == _test_metrics(_cubeline(fresh, "train", "--json"))
    _no_orphans(repo)


@pytest.mark.parametrize("policy", ["refuse", "ridge"])
def test_zero_variance_training_data_end_to_end(repo: Path, tmp_path: Path, policy: str
                                                ) -> None:
    import json

    import numpy as np
    import yaml

    rng = np.random.default_rng(0)
    frames = []
    for i in range(3):
        cube = rng.normal(100, 5, (12, 12, 205)).astype(np.float32)
        cube[..., 7] = 42.0  # a dead band
        mask = np.zeros((12, 12), bool)
        mask[2:4, 2:4] = True
        cube[mask] += 40
        np.savez(tmp_path / f"f{i}.npz", cube=cube, mask=mask)
        frames.append(str(tmp_path / f"f{i}.npz"))
    ingest = _cubeline(repo, "ingest", *frames, "--json")
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    version = json.loads(ingest.stdout.strip().splitlines()[-1])["version"]
    params = repo / "params.yaml"
    doc = yaml.safe_load(params.read_text())
    doc["phase1"]["degenerate"] = policy
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = _cubeline(repo, "train", "--data-version", version, "--json")
    if policy == "refuse":
        assert_clean_failure(proc.returncode, proc.stderr, "train", 8, "zero-variance", "ridge")
    else:  # repaired with the stated ridge, recorded in the run
        assert proc.returncode == 0, proc.stderr[-3000:]
        import sqlite3

        with sqlite3.connect(repo / "mlflow.db") as con:
            keys = {k for (k,) in con.execute("select key from params")}
        assert "phase1/ridge_eps" in keys
    _no_orphans(repo)
    assert "RUNNING" not in run_states(repo)
    assert undecided_versions(repo) == []
