"""The operator's loop, driven from outside as an operator runs it (used by a test and a bench).

Real processes against a real ``prefect server start``: ``cubeline run`` makes a champion,
``cubeline serve`` serves the deployments, ``cubeline serve-model`` answers scoring requests,
``cubeline drift FILES`` ingests new frames and checks them. The new frames are the bundled
scenes with a SIMULATED illumination change (a smooth per-band gain and offset): no real drifted
capture of these scenes exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import scipy.io

SCENES = ("abu-airport-1", "abu-airport-2", "abu-airport-3", "abu-urban-4", "abu-urban-5")

_T = TypeVar("_T")


def cubeline_env(api_url: str, home: Path) -> dict[str, str]:
    """Environment of a cubeline process against the server at ``api_url``.

    MLflow URIs of this process (``mlflow.set_tracking_uri`` exports one) are left out: the
    cubeline process uses its repository's own store, as on an operator's machine.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return {**env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home)}


def cubeline(root: Path, env: dict[str, str], *args: str, timeout: float = 400) -> str:
    """Run ``cubeline ARGS`` in ``root``; returns stdout (fails on a non-zero exit)."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"cubeline {args} exited {proc.returncode}:\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc.stdout


@contextmanager
def background(
    root: Path,
    env: dict[str, str],
    log: Path,
    *args: str,
    stop: signal.Signals = signal.SIGINT,
    within_s: float = 20.0,
) -> Iterator[Any]:
    """``cubeline ARGS`` as a background process (its own session), stopped with ``stop``.

    On a normal exit of the block, the command must end within ``within_s`` seconds of the
    signal and leave nothing of its process group behind (flow-run subprocesses included);
    otherwise it is killed and the block fails.
    """
    out: IO[str] = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    failing = False
    try:
        yield proc
    except BaseException:
        failing = True
        raise
    finally:
        problem = _stop_group(proc, stop, within_s)
        out.close()
        if problem and not failing:
            raise AssertionError(f"cubeline {' '.join(args)}: {problem} (log: {log})")


def _stop_group(proc: subprocess.Popen[Any], stop: signal.Signals, within_s: float) -> str:
    """Signal the process group of ``proc``; what went wrong ('' when it stopped cleanly)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, stop)
    try:
        proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return f"still running {within_s:g} s after {stop.name}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return ""
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return f"left processes of its group running after {stop.name}"


def wait_for(what: str, fn: Callable[[], _T | None], timeout: float, every: float = 1.0) -> _T:
    """Poll ``fn`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def write_frames(root: Path, out_dir: Path, *, simulate_illumination: bool) -> list[Path]:
    """The five bundled scenes as new frame files, SIMULATED-dimmed when asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCENES:
        scene = scipy.io.loadmat(root / "data" / "session" / f"{name}.mat")
        cube = scene["data"].astype(np.float64)
        if simulate_illumination:
            t = np.linspace(0.0, 1.0, cube.shape[-1])
            cube = cube * (0.75 + 0.15 * t) + 0.03 * cube.mean(axis=(0, 1)) * (1.0 - t)
        prefix = "simulated-dim" if simulate_illumination else "new"
        path = out_dir / f"{prefix}-{name}.mat"
        scipy.io.savemat(path, {"data": cube, "map": scene["map"]})
        paths.append(path)
    return paths


def health(url: str) -> dict[str, Any] | None:
    """``GET /health`` of a serve-model endpoint (None while it does not answer)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return dict(json.loads(resp.read()))
    except OSError:
        return None


def retrain_runs(deployment_id: Any) -> list[Any]:
    """Flow runs of the retrain deployment (this process's PREFECT_API_URL)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        )


def triggered_runs(deployment_id: Any) -> list[Any]:
    """Retrain runs that a drift event started (their ``event_id`` parameter is set)."""
    return [r for r in retrain_runs(deployment_id) if r.parameters.get("event_id")]
