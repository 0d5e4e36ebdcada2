"""Sharded Phase 1 benchmark: in-process vs Prefect's DaskTaskRunner with 1 and 2 local workers.

Data: ``--cubes`` (default 32) seeded synthetic cubes of 256 x 256 x 61 (bench/synthetic.py)
written as Cubert SDK-free ``.npz`` exports (keys cube, wavelengths, mask, class_mask) to a temp
dir and read back by whoever runs the pass: the driver in-process, the workers when sharded —
over many frames Phase 1 is bound by reading and decoding frames, which is what sharding
spreads. Both ``np.savez`` (plain) and ``np.savez_compressed`` files are measured (``--formats``).

Pipelines (``--pipelines``):

- ``chain``: normalizer → selector → RX, one data pass (the Phase-1 benchmark pipeline);
- ``preset``: the ``fit_statistics`` pipeline (``build_channel_selector_pipeline``: the logit
  head behind RX needs a second pass; workers keep their frames between the passes).

Runs (Phase 1 with ``normal_only=True`` as in ``params.yaml``, batch size 4):

- ``inprocess``: ``StatisticalTrainer`` over a ``CubeDataModule`` of the files, in this process
  with torch's default thread count; the data module's ``setup`` (read + validate every frame)
  is timed with the fit, since the sharded runs read the frames inside the fit;
- ``dask_1`` / ``dask_2``: the same with ``shard_runner`` = :mod:`tasks.sharding` on a
  LocalCluster of 1 / 2 single-thread worker processes (BLAS/OpenMP threads 1), 1 / 2 shards.

Local workers run with the glibc allocator tuned by :func:`tasks.env.tune_allocator`
(as ``make_shard_runner`` starts them); the driver's allocator is glibc's default. The same
tuning helps the in-process pass too, so each figure also has ``inprocess_tuned_allocator``:
the in-process pass in a child process that called ``tune_allocator`` first (one warm-up, then
``--repeats`` timed fits, not interleaved with the rounds), and
``speedup_2_workers_vs_tuned_inprocess`` against it: the like-for-like ratio.

Other processes on the machine take cores from the workers: the script measures how much of two
cores two single-thread processes actually get (``parallel_capacity``, ideal 2.0) at the start
and at the end, and records the load average; quote those with the figures.

Each round runs all three, interleaved, bracketed by two quick capacity checks; a round is
*quiet* when both found two free cores (``--quiet``, default 1.8 of 2.0). Rounds repeat until
``--repeats`` quiet rounds (default 3) or ``--max-rounds`` (default 8); figures are the best
time over the quiet rounds (over all rounds, flagged, when none was quiet), with the per-round
speedup median and the all-rounds figures beside them. The clusters are started and warmed
once before timing (their cold start, including worker imports, is reported separately), and
each timed fit has a new fit token, so workers read their frames again. Throughput = frame
pixels (N x H x W) / fit wall time. ``max_rel_diff`` compares every merged root statistic (n,
mean, M2, min, max) with the in-process one.

Usage::

    .venv/bin/python bench/sharded.py                 # full run (5-15 min on 2 cores)
    .venv/bin/python bench/sharded.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthetic import add_cube_args

from tasks.env import cpu_model

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    import torch

    cpu = cpu_model()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads_inprocess": torch.get_num_threads(), "commit": commit,
            "loadavg_at_start": os.getloadavg()}


_SPIN = """
import time, numpy as np
a = np.random.default_rng(0).standard_normal((256, 256))
t = time.perf_counter()
for _ in range(ITER):
    a = np.tanh(a @ a * 1e-3)
print(time.perf_counter() - t)
"""


def parallel_capacity(iterations: int = 800) -> dict[str, float]:
    """How much of 2 cores two single-thread processes get right now (ideal 2.0).

    The same CPU-bound numpy loop runs in 1 process, then in 2 processes at once; capacity =
    2 x t(1) / max t(2), timed inside the children (interpreter start excluded). Other load
    on the machine shows up here as well as in the sharded timings.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    code = _SPIN.replace("ITER", str(iterations))

    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True, env=env) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    one = run(1)
    two = run(2)
    return {"one_process_s": round(one, 3), "two_processes_s": round(two, 3),
            "capacity": round(2 * one / two, 3)}


def write_frames(directory: Path, n: int, size: int, channels: int, compressed: bool,
                 seed: int) -> list[Path]:
    import numpy as np

    if TYPE_CHECKING:  # mypy maps bench/ as a source root (mypy_path), so the file is `synthetic`
        from synthetic import make_cubes
    else:
        from bench.synthetic import make_cubes

    cubes, masks = make_cubes(n, size=size, channels=channels, seed=seed)
    save = np.savez_compressed if compressed else np.savez
    wavelengths = np.linspace(450, 850, channels).round().astype(np.int32)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"frame_{i:04d}.npz"
        save(path, cube=cubes[i], wavelengths=wavelengths, mask=masks[i].astype(np.uint8),
             class_mask=masks[i].astype(np.uint8))
        paths.append(path)
    return paths


def build(kind: str, channels: int) -> Any:
    from nodes import AnomalyDataNode, MinMaxNormalizer, Pipeline, RXGlobal, SoftChannelSelector
    from nodes.library.presets import build_channel_selector_pipeline

    if kind == "preset":
        return build_channel_selector_pipeline(input_channels=channels)
    pipe = Pipeline("chain")
    data = AnomalyDataNode(name="data")
    norm = MinMaxNormalizer(name="normalizer")
    sel = SoftChannelSelector(n_select=10, input_channels=channels, name="selector")
    rx = RXGlobal(num_channels=10, eps=1e-6, name="rx")
    pipe.connect((data.cube, norm.data), (norm.normalized, sel.data), (sel.selected, rx.data))
    return pipe


def rel_diff(a: Any, b: Any) -> float:
    import torch

    worst = 0.0
    for x, y in zip(a.to_dict().values(), b.to_dict().values(), strict=True):
        finite = torch.isfinite(y)
        if not torch.equal(finite, torch.isfinite(x)):
            return float("inf")
        if bool(finite.any()):
            scale = torch.linalg.norm(y[finite]).clamp_min(1e-300)
            worst = max(worst, float(torch.linalg.norm(x[finite] - y[finite]) / scale))
    return worst


def run_inprocess(paths: list[Path], kind: str, channels: int, batch: int) -> dict[str, Any]:
    import torch

    from nodes import StatisticalTrainer
    from nodes.data import CubeDataModule

    torch.manual_seed(0)
    pipe = build(kind, channels)
    t0 = time.perf_counter()
    dm = CubeDataModule([str(p) for p in paths], list(range(len(paths))), [0], [0],
                        batch_size=batch, expected_channels=channels)
    dm.setup("fit")
    t1 = time.perf_counter()
    report = StatisticalTrainer(pipe, dm, normal_only=True).fit()
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "read_s": t1 - t0, "passes_s": t2 - t1,
            "passes": report.passes, "moments": report.root_moments}


def run_inprocess_tuned(paths: list[Path], kind: str, args: argparse.Namespace
                        ) -> dict[str, Any]:
    """The in-process pass in a child process with the workers' allocator tuning."""
    job = {"paths": [str(p) for p in paths], "kind": kind, "channels": args.channels,
           "batch": args.batch_size, "repeats": args.repeats}
    out = subprocess.run([sys.executable, __file__, "--child-inprocess", json.dumps(job)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_inprocess(job: dict[str, Any]) -> None:
    """Child of :func:`run_inprocess_tuned`: tune the allocator, warm up, time the fits."""
    from tasks.env import tune_allocator

    tuning = tune_allocator()
    paths = [Path(p) for p in job["paths"]]
    run_inprocess(paths, job["kind"], job["channels"], job["batch"])  # warm-up
    secs = []
    for _ in range(job["repeats"]):
        secs.append(run_inprocess(paths, job["kind"], job["channels"], job["batch"])["seconds"])
    print(json.dumps({"best_s": round(min(secs), 3), "all_s": [round(t, 3) for t in secs],
                      "tuning": tuning, "loadavg": os.getloadavg()}))


def run_sharded(task_map: Any, paths: list[Path], kind: str, channels: int, batch: int,
                n_shards: int) -> dict[str, Any]:
    import torch

    from nodes import StatisticalTrainer
    from nodes.training.sharding import ShardDataSpec, ShardedPassRunner

    torch.manual_seed(0)
    pipe = build(kind, channels)
    spec = ShardDataSpec(tuple(str(p) for p in paths), tuple(range(len(paths))),
                         batch_size=batch, expected_channels=channels)
    t0 = time.perf_counter()
    with ShardedPassRunner(task_map, spec, n_shards, torch_threads=1) as runner:
        report = StatisticalTrainer(pipe, None, normal_only=True, shard_runner=runner).fit()
    seconds = time.perf_counter() - t0
    passes = []
    for p in runner.passes:
        shard_total = max(r["timings"]["total_s"] for r in p.results)
        passes.append({
            "roots": p.roots,
            "wall_s": round(p.seconds, 4),
            "slowest_shard_s": round(shard_total, 4),
            "orchestration_s": round(p.seconds - shard_total, 4),
            "shards": [{"frames": len(r["frame_ids"]), "worker": r["dask_worker"],
                        "reused_frames": r["reused_frames"], "torch_threads": r["torch_threads"],
                        **{k: round(v, 4) for k, v in r["timings"].items()}}
                       for r in p.results],
        })
    return {"seconds": seconds, "passes": report.passes, "moments": report.root_moments,
            "breakdown": passes}


def measure(maps: dict[int, Any], paths: list[Path], kind: str, args: argparse.Namespace,
            n_pix: int) -> dict[str, Any]:
    """In-process, 1 and 2 Dask workers, interleaved in rounds.

    Each round is bracketed by a quick :func:`parallel_capacity` check; a round is *quiet* when
    both checks found two free cores (capacity >= ``args.quiet``). Rounds continue until
    ``args.repeats`` quiet rounds are collected or ``args.max_rounds`` have run. The headline
    figures are the best times over the quiet rounds (over all rounds when none was quiet,
    flagged by ``quiet_rounds == 0``); the all-round figures are reported beside them.
    """
    rounds: list[dict[str, Any]] = []
    while len(rounds) < args.max_rounds and sum(r["quiet"] for r in rounds) < args.repeats:
        before = parallel_capacity(250)["capacity"]
        rnd: dict[str, Any] = {"inprocess": run_inprocess(paths, kind, args.channels,
                                                          args.batch_size)}
        for n in (1, 2):
            rnd[f"dask_{n}"] = run_sharded(maps[n], paths, kind, args.channels,
                                           args.batch_size, n)
        after = parallel_capacity(250)["capacity"]
        rnd["capacity"] = [before, after]
        rnd["quiet"] = min(before, after) >= args.quiet
        rounds.append(rnd)
    names = ("inprocess", "dask_1", "dask_2")
    ref = rounds[0]["inprocess"]["moments"]
    diff = max(rel_diff(r[name]["moments"][root], ref[root])
               for r in rounds for name in names for root in ref)
    quiet = [r for r in rounds if r["quiet"]]
    use = quiet or rounds
    entry: dict[str, Any] = {
        "cubes": len(paths), "passes": rounds[0]["inprocess"]["passes"], "max_rel_diff": diff,
        "rounds": len(rounds), "quiet_rounds": len(quiet),
        "capacity_per_round": [r["capacity"] for r in rounds],
    }
    for name in names:
        secs = [r[name]["seconds"] for r in use]
        best = min(range(len(use)), key=lambda i: secs[i])
        entry[name] = {"best_s": round(secs[best], 3),
                       "median_s": round(statistics.median(secs), 3),
                       "mpix_s": round(n_pix / secs[best] / 1e6, 2),
                       "all_rounds_s": [round(r[name]["seconds"], 3) for r in rounds]}
        if name == "inprocess":
            entry[name]["read_validate_s"] = round(use[best][name]["read_s"], 3)
            entry[name]["passes_s"] = round(use[best][name]["passes_s"], 3)
        else:
            entry[name]["breakdown"] = use[best][name]["breakdown"]
    base = entry["inprocess"]["best_s"]
    entry["speedup_1_worker"] = round(base / entry["dask_1"]["best_s"], 3)
    entry["speedup_2_workers"] = round(base / entry["dask_2"]["best_s"], 3)
    entry["speedup_2_workers_per_round_median"] = round(statistics.median(
        r["inprocess"]["seconds"] / r["dask_2"]["seconds"] for r in use), 3)
    entry["speedup_2_workers_all_rounds"] = round(
        min(r["inprocess"]["seconds"] for r in rounds)
        / min(r["dask_2"]["seconds"] for r in rounds), 3)
    tuned = run_inprocess_tuned(paths, kind, args)
    entry["inprocess_tuned_allocator"] = {**tuned,
                                          "mpix_s": round(n_pix / tuned["best_s"] / 1e6, 2)}
    entry["speedup_2_workers_vs_tuned_inprocess"] = round(
        tuned["best_s"] / entry["dask_2"]["best_s"], 3)
    return entry


def report_line(kind: str, entry: dict[str, Any]) -> None:
    orch = [p["orchestration_s"] for p in entry["dask_2"]["breakdown"]]
    print(f"  {kind:6s} ({entry['passes']} pass(es)): in-process "
          f"{entry['inprocess']['mpix_s']} Mpix/s, dask 1 worker {entry['dask_1']['mpix_s']}, "
          f"2 workers {entry['dask_2']['mpix_s']} -> speedup x{entry['speedup_2_workers']} "
          f"(per-round median x{entry['speedup_2_workers_per_round_median']}, all rounds "
          f"x{entry['speedup_2_workers_all_rounds']}; {entry['quiet_rounds']}/{entry['rounds']} "
          f"quiet rounds); orchestration per pass (2 workers) {orch} s; max rel diff "
          f"{entry['max_rel_diff']:.2e}; in-process with the workers' allocator tuning "
          f"{entry['inprocess_tuned_allocator']['mpix_s']} Mpix/s -> like-for-like speedup "
          f"x{entry['speedup_2_workers_vs_tuned_inprocess']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_cube_args(ap, cubes=32, repeats_help="quiet rounds wanted per figure")
    ap.add_argument("--max-rounds", type=int, default=8, help="rounds at most per figure")
    ap.add_argument("--quiet", type=float, default=1.8,
                    help="2-process capacity (of 2.0) that makes a round quiet")
    ap.add_argument("--formats", default="plain,compressed")
    ap.add_argument("--pipelines", default="chain,preset")
    ap.add_argument("--scale", default="128",
                    help="extra cube counts for plain/chain (how the per-pass cost amortizes)")
    ap.add_argument("--quick", action="store_true", help="8 small cubes, 1 repeat")
    ap.add_argument("--child-inprocess", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_inprocess:
        child_inprocess(json.loads(args.child_inprocess))
        return
    if args.quick:
        args.cubes, args.size, args.repeats, args.max_rounds, args.scale = 8, 64, 1, 1, "16"

    from tasks.env import disable_telemetry

    disable_telemetry()
    from tasks.sharding import TaskRunnerMap, _shard_key, dask_task_runner, worker_api_url

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; "
          f"load {info['loadavg_at_start']}", flush=True)
    capacity_start = parallel_capacity()
    print(f"2-process capacity now: x{capacity_start['capacity']} (ideal 2.0)", flush=True)
    t = time.perf_counter()
    api = worker_api_url()
    api_start_s = time.perf_counter() - t
    print(f"Prefect API {api} ready in {api_start_s:.1f} s", flush=True)

    maps = {n: TaskRunnerMap(functools.partial(dask_task_runner, None, n), kind="dask",
                             affinity=_shard_key, tune_workers=True) for n in (1, 2)}
    root = Path(tempfile.mkdtemp(prefix="cubeline-sharded-"))
    n_pix = args.cubes * args.size * args.size
    results: dict[str, Any] = {}
    try:
        cold: dict[str, float] = {}
        for fmt in [f for f in args.formats.split(",") if f]:
            t = time.perf_counter()
            paths = write_frames(root / fmt, args.cubes, args.size, args.channels,
                                 compressed=fmt == "compressed", seed=0)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            print(f"\n[{fmt}] wrote {args.cubes} cubes of {args.size}x{args.size}x"
                  f"{args.channels} ({mb:.0f} MB) in {time.perf_counter() - t:.1f} s", flush=True)
            for n, task_map in maps.items():
                if not task_map.started:  # cold start: cluster + worker imports + first fit
                    t = time.perf_counter()
                    run_sharded(task_map, paths[: max(n, 2)], "chain", args.channels,
                                args.batch_size, n)
                    cold[f"dask_{n}"] = round(time.perf_counter() - t, 2)
                    print(f"  cold start of {n}-worker cluster + first tiny fit: "
                          f"{cold[f'dask_{n}']} s", flush=True)
            for kind in [k for k in args.pipelines.split(",") if k]:
                entry = measure(maps, paths, kind, args, n_pix)
                results[f"{fmt}/{kind}"] = entry
                report_line(kind, entry)
            shutil.rmtree(root / fmt, ignore_errors=True)
        for n in [int(v) for v in args.scale.split(",") if v]:
            paths = write_frames(root / f"scale{n}", n, args.size, args.channels,
                                 compressed=False, seed=0)
            print(f"\n[plain, {n} cubes]", flush=True)
            entry = measure(maps, paths, "chain", args, n * args.size * args.size)
            results[f"plain/chain/{n}_cubes"] = entry
            report_line("chain", entry)
            shutil.rmtree(root / f"scale{n}", ignore_errors=True)
    finally:
        for task_map in maps.values():
            task_map.close()
        shutil.rmtree(root, ignore_errors=True)

    info["loadavg_at_end"] = os.getloadavg()
    capacity_end = parallel_capacity()
    print(f"2-process capacity at the end: x{capacity_end['capacity']}", flush=True)
    head_key = next(iter(results))
    head = results[head_key]
    out = {
        "bench": "sharded_phase1",
        "headline": head_key,
        "max_rel_diff": max(r["max_rel_diff"] for r in results.values()),
        "speedup_2_workers": head["speedup_2_workers"],
        "speedup_1_worker": head["speedup_1_worker"],
        "speedup_2_workers_vs_tuned_inprocess": head["speedup_2_workers_vs_tuned_inprocess"],
        "inprocess_tuned_allocator_mpix_s": head["inprocess_tuned_allocator"]["mpix_s"],
        "inprocess_mpix_s": head["inprocess"]["mpix_s"],
        "dask_1_worker_mpix_s": head["dask_1"]["mpix_s"],
        "dask_2_workers_mpix_s": head["dask_2"]["mpix_s"],
        "target_speedup": 1.6,
        "cubes": args.cubes, "shape": [args.size, args.size, args.channels],
        "batch_size": args.batch_size, "repeats": args.repeats,
        "prefect_api_start_s": round(api_start_s, 2), "cold_start_s": cold,
        "parallel_capacity": {"start": capacity_start, "end": capacity_end},
        "worker_allocator_tuning": {f"dask_{n}": m.worker_tuning for n, m in maps.items()},
        "results": results, "machine": info,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
