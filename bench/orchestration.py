"""Orchestration overhead of ``cubeline run`` (Prefect + MLflow + DVC) against the same steps
called directly.

Every measurement is one fresh process timed from outside (imports included), in a fresh copy of
the repository whose data is already checked out (so no run pays the ``dvc pull``); the variants
are interleaved and the minimum of ``--repeat`` rounds is kept:

- ``direct``: the same compute with the ``nodes`` API alone (read + validate, Phase 1, save the
  init state, unfreeze, Phase 2 with the params.yaml config, test evaluation, save the model);
- ``warm``: ``cubeline run`` against a running ``prefect server start`` (started beforehand,
  not timed) and an existing MLflow store (steady state);
- ``cold``: ``cubeline run`` with Prefect's temporary API server (started by the run) and a
  fresh MLflow store (the first run of a fresh clone);
- ``second``: ``cubeline run`` again in the warm copy (load_cubes cached, Phase 1 skipped: the
  champion's state is reused after the drift check), and ``cubeline train`` twice in a fresh
  copy (the second one skips Phase 1 through the cache).

The last line of stdout is one JSON object with ``overhead_fraction`` =
``(warm - direct) / warm`` (minimum of each over the rounds) and ``cold_overhead_s`` =
``cold - direct``; on a shared machine ``overhead_fraction_median_of_rounds`` (each round's pair
ran back to back) is the steadier figure. Usage::

    .venv/bin/python -m bench.orchestration [--repeat N] [--epochs E]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

from tests.flows.helpers import (
    copy_repo,
    edit_params,
    free_port,
    prefect_server_command,
    wait_healthy,
)

REPO = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from nodes import AnomalyDetectionMetrics, Node


def direct(root: Path) -> dict[str, float]:
    """The flow's compute, no orchestration: returns per-step seconds."""
    t0 = time.perf_counter()
    from nodes.data.datamodule import CubeDataModule
    from nodes.graph.pipeline import Pipeline
    from nodes.training.gradient_trainer import GradientTrainer
    from nodes.training.init_state import load_init_state, save_init_state
    from nodes.training.statistical_trainer import StatisticalTrainer
    from tasks.params import load_params, resolve_path
    from tasks.steps import build_pipeline, score_split

    marks = {"imports": time.perf_counter() - t0}
    p = load_params(root / "params.yaml")
    out = root / "outputs" / "direct"
    t = time.perf_counter()
    dm = CubeDataModule(
        [resolve_path(root / "params.yaml", f) for f in p.data.paths],
        p.data.train_ids,
        p.data.val_ids,
        p.data.test_ids,
        batch_size=p.data.batch_size,
        expected_channels=p.data.expected_channels,
        normal_class_ids=p.pipeline.normal_class_ids,
        seed=p.phase2.seed,
    )
    dm.setup("fit")
    marks["load"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe = build_pipeline(p, dm.num_channels)
    st = StatisticalTrainer(
        pipe,
        dm,
        normal_only=p.phase1.normal_only,
        sample_fraction=p.phase1.sample_fraction,
        seed=p.phase1.seed,
    )
    report = st.fit()
    st.validate()
    save_init_state(pipe, out / "init_state.pt", source_data_hash="direct", fit_report=report)
    marks["phase1"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe = build_pipeline(p, dm.num_channels)
    load_init_state(pipe, out / "init_state.pt")
    pipe.unfreeze_nodes_by_name(p.pipeline.unfreeze)
    cfg = p.phase2.trainer
    cfg = cfg.model_copy(
        update={
            "default_root_dir": str(out / "lightning"),
            # No logger here, and Lightning's LR monitor refuses to run without one.
            "callbacks": cfg.callbacks.model_copy(update={"lr_monitor": None}),
        }
    )
    GradientTrainer(
        pipe,
        dm,
        [cast("Node", pipe.nodes["bce"])],
        [cast("AnomalyDetectionMetrics", pipe.nodes["metrics_anomaly"])],
        trainer_config=cfg,
        optimizer_config=p.phase2.optimizer,
        scheduler_config=p.phase2.scheduler,
        seed=p.phase2.seed,
        threshold_method=p.threshold.method,
        target_fpr=p.threshold.target_fpr,
    ).fit()
    marks["phase2"] = time.perf_counter() - t
    t = time.perf_counter()
    score_split(pipe, dm, "test")
    pipe.save_to_file(out / "pipeline.yaml")
    Pipeline.load_from_file(out / "pipeline.yaml")
    marks["evaluate"] = time.perf_counter() - t
    return marks


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def _copy(base: Path, name: str, epochs: int | None) -> Path:
    root = copy_repo(base / name)
    if epochs is not None:
        edit_params(root, phase2={"trainer": {"max_epochs": epochs}})
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "pull", "-q"], cwd=root, check=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (min is kept)")
    ap.add_argument("--epochs", type=int, default=None, help="override phase2 max_epochs")
    ap.add_argument("--direct", type=Path, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.direct:
        print(json.dumps(direct(args.direct)))
        return

    from tasks.env import TELEMETRY_ENV

    py = sys.executable
    cli = [py, "-m", "flows.cli"]
    base = Path(tempfile.mkdtemp(prefix="cubeline-bench-"))
    home = base / "prefect-home"  # one client home for every run: a warm Prefect database
    env = {**os.environ, **TELEMETRY_ENV, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = sys.stderr
    # Prime the client's Prefect database once, so that 'cold' starts its temporary server on
    # an existing database (STACK.md: 10-13 s), as every run after the first on a machine does.
    subprocess.run(
        [py, "-c", "from prefect import flow\n@flow\ndef f(): pass\nf()"],
        env=env,
        capture_output=True,
        check=True,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(base / "server-home"), "PREFECT_UI_ENABLED": "false"}
    server = subprocess.Popen(
        prefect_server_command(port),
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    warm_env = {**env, "PREFECT_API_URL": url}
    times: dict[str, list[float]] = {"direct": [], "warm": [], "cold": []}
    try:
        t = time.perf_counter()
        wait_healthy(url, timeout=180, proc=server)
        server_start_s = time.perf_counter() - t
        print(f"{'prefect server start':<28} {server_start_s:7.1f} s  (not counted)", file=log)
        # Interleaved, so that a change in the machine's load hits every variant alike.
        for i in range(args.repeat):
            root = _copy(base, f"direct{i}", args.epochs)
            secs, out = _timed([py, "-m", "bench.orchestration", "--direct", str(root)], REPO, env)
            if not times["direct"] or secs < min(times["direct"]):
                direct_out = out  # the step times of the fastest round, reported with it
            times["direct"].append(secs)
            root = _copy(base, f"warm{i}", args.epochs)
            # The tracking store exists in steady state, like the server: create it untimed.
            _timed([*cli, "history"], root, warm_env)
            secs, warm_out = _timed([*cli, "run", "--json"], root, warm_env)
            times["warm"].append(secs)
            warm_root = root
            secs, _ = _timed([*cli, "run"], _copy(base, f"cold{i}", args.epochs), env)
            times["cold"].append(secs)
            print(
                f"round {i + 1}: direct {times['direct'][-1]:.1f} s, warm {times['warm'][-1]:.1f}"
                f" s, cold (fresh store) {times['cold'][-1]:.1f} s",
                file=log,
            )
        second_s, second_out = _timed([*cli, "run", "--json"], warm_root, warm_env)
        print(f"{'second run (same copy)':<28} {second_s:7.1f} s", file=log)
        train_root = _copy(base, "train", args.epochs)
        train1_s, train1_out = _timed([*cli, "train", "--json"], train_root, warm_env)
        train2_s, train2_out = _timed([*cli, "train", "--json"], train_root, warm_env)
        print(f"{'train, then train again':<28} {train1_s:7.1f} s, {train2_s:.1f} s", file=log)
    finally:
        server.terminate()
        server.wait(timeout=60)
    direct_s, warm_s, cold_s = (min(times[k]) for k in ("direct", "warm", "cold"))
    pairs = list(zip(times["direct"], times["warm"], strict=True))

    def phase1(out: str) -> str:
        return str(json.loads(out.strip().splitlines()[-1])["phase1"])

    warm_summary = json.loads(warm_out.strip().splitlines()[-1])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "runs": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
        "epochs": warm_summary["train"]["epochs"],
        "direct_s": round(direct_s, 2),
        "direct_steps_s": {k: round(v, 2) for k, v in json.loads(direct_out).items()},
        "warm_s": round(warm_s, 2),
        "warm_flow_s": round(float(warm_summary["seconds"]), 2),
        "cold_s": round(cold_s, 2),
        "server_start_s": round(server_start_s, 2),
        "second_run_s": round(second_s, 2),
        "second_run_phase1": phase1(second_out),
        "train_s": round(train1_s, 2),
        "train_again_s": round(train2_s, 2),
        "train_again_phase1": phase1(train2_out),
        "train_phase1": phase1(train1_out),
        # Rounds run back to back, so each round's pair saw about the same machine load.
        "overhead_s_per_round": [round(w - d, 2) for d, w in pairs],
        "overhead_fraction_median_of_rounds": round(
            statistics.median((w - d) / w for d, w in pairs), 4
        ),
        "overhead_fraction": round((warm_s - direct_s) / warm_s, 4),
        "cold_overhead_s": round(cold_s - direct_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
