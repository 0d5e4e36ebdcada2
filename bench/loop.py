"""The retraining loop, timed: drift event → new champion answering, and serving figures.

Runs in a throwaway copy of the repository against a real ``prefect server start`` on
127.0.0.1 (own PREFECT_HOME), with ``cubeline serve`` and ``cubeline serve-model`` in the
background, exactly as an operator would (see docs/orchestration.md):

1. ``cubeline run`` → champion v1;
2. ``cubeline drift FRAMES`` on the bundled scenes with a SIMULATED illumination change →
   ``cubeline.drift.detected``; the served retrain deployment re-initializes on that data version;
3. the time from the event to ``serve-model`` answering with the new version is measured
   (``event_to_serving_s``; also split into event → run started, run, alias → served);
4. serving latency (one 100 x 100 x 205 frame, sequential requests) and throughput (batches of
   ``--batch`` frames, and ``--clients`` concurrent single-frame clients).

Prints progress on stderr and one JSON object on the last line of stdout. Needs ~3-5 minutes.

    .venv/bin/python -m bench.loop [--requests 50] [--batch 8] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from tasks.env import cpu_model, disable_telemetry
from tests.flows.helpers import (
    FAST_PARAMS,
    copy_repo,
    edit_params,
    free_port,
    prefect_server_command,
    wait_healthy,
)
from tests.flows.loop import (
    background,
    cubeline,
    cubeline_env,
    health,
    triggered_runs,
    wait_for,
    write_frames,
)


def _say(msg: str) -> None:
    print(f"[loop] {msg}", file=sys.stderr, flush=True)


def _latency(url: str, cubes: np.ndarray, n: int) -> list[float]:
    from tasks.serving import score_remote

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        score_remote(url, cubes)
        times.append(time.perf_counter() - t0)
    return times


def _concurrent(url: str, cube: np.ndarray, clients: int, per_client: int) -> float:
    """Frames per second with ``clients`` threads each sending ``per_client`` single frames."""
    from tasks.serving import score_remote

    def work() -> None:
        for _ in range(per_client):
            score_remote(url, cube)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * per_client / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50, help="sequential single-frame requests")
    ap.add_argument("--batch", type=int, default=8, help="frames per batch request")
    ap.add_argument("--clients", type=int, default=2, help="concurrent clients")
    ap.add_argument("--epochs", type=int, default=20, help="Phase-2 epochs")
    args = ap.parse_args()
    disable_telemetry()

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import RETRAIN_DEPLOYMENT

    tmp = Path(tempfile.mkdtemp(prefix="cubeline-loop-"))
    root = copy_repo(tmp / "repo")
    edit_params(root, **FAST_PARAMS)
    edit_params(root, phase2={"trainer": {"max_epochs": args.epochs}},
                schedule={"drift_watch_interval_s": 86400})
    sport = free_port()
    api = f"http://127.0.0.1:{sport}/api"
    home = tmp / "prefect-home"
    home.mkdir()
    server_env = {**cubeline_env(api, home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
                  "PREFECT_SERVER_API_PORT": str(sport), "PREFECT_UI_ENABLED": "false"}
    server = subprocess.Popen(prefect_server_command(sport), env=server_env,
                              stdout=(tmp / "server.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    cpus = len(os.sched_getaffinity(0))
    result: dict[str, Any] = {"machine": f"{cpu_model()}, {cpus} CPUs", "epochs": args.epochs,
                              "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    try:
        wait_healthy(api, timeout=180, proc=server)
        env = cubeline_env(api, tmp / "client-home")
        _say("cubeline run (champion v1)")
        cubeline(root, env, "run")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with (
            temporary_settings({PREFECT_API_URL: api}),
            background(root, env, tmp / "serve.log", "serve"),
            background(root, env, tmp / "model.log", "serve-model", "--port", str(port),
                       "--poll-s", "1"),
        ):
            from prefect.client.orchestration import get_client

            def retrain_dep() -> Any:
                with get_client(sync_client=True) as c:
                    return next((d for d in c.read_deployments() if d.name == RETRAIN_DEPLOYMENT),
                                None)

            dep = wait_for("deployments", retrain_dep, timeout=180)
            wait_for("serve-model", lambda: health(url), timeout=120)
            dim = write_frames(root, tmp / "dim", simulate_illumination=True)
            _say("cubeline drift on SIMULATED dimmed frames")
            out = cubeline(root, env, "drift", *map(str, dim))
            t_event = time.time()  # the event is emitted at the end of the drift run
            version = out.split("ingested as data version ")[1].split()[0]
            run = wait_for("triggered run", lambda: next(
                (r for r in triggered_runs(dep.id) if r.state and r.state.is_final()), None),
                timeout=900, every=0.5)
            served = wait_for("new champion served", lambda: (
                h if (h := health(url)) and h["version"] != "1" else None), timeout=60, every=0.2)
            t_served = time.time()
            started = run.start_time.timestamp() if run.start_time else float("nan")
            ended = run.end_time.timestamp() if run.end_time else float("nan")
            result.update(
                data_version=version,
                new_version=served["version"],
                event_to_serving_s=round(t_served - t_event, 2),
                event_to_run_start_s=round(started - t_event, 2),
                retrain_run_s=round(ended - started, 2),
                run_end_to_serving_s=round(t_served - ended, 2),
            )
            _say(f"new champion v{served['version']} served {result['event_to_serving_s']} s "
                 "after the event")

            frame = np.asarray(
                scipy.io.loadmat(root / "data" / "session" / "abu-urban-5.mat")["data"],
                np.float32,
            )[None]
            _latency(url, frame, 3)  # warm-up
            lat = np.array(_latency(url, frame, args.requests))
            batch = np.repeat(frame, args.batch, axis=0)
            blat = np.array(_latency(url, batch, max(5, args.requests // args.batch)))
            result.update(
                frame_shape=list(frame.shape[1:]),
                load_avg_1m_at_end=round(os.getloadavg()[0], 2),
                latency_ms_p50=round(1e3 * float(np.median(lat)), 2),
                latency_ms_p95=round(1e3 * float(np.percentile(lat, 95)), 2),
                throughput_frames_s_sequential=round(1.0 / float(np.mean(lat)), 1),
                batch=args.batch,
                batch_latency_ms_p50=round(1e3 * float(np.median(blat)), 2),
                throughput_frames_s_batch=round(args.batch / float(np.mean(blat)), 1),
                clients=args.clients,
                throughput_frames_s_concurrent=round(
                    _concurrent(url, frame, args.clients, max(5, args.requests // 2)), 1),
            )
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
