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

Each round runs all three, interleaved, ``--repeats`` times; figures are the best round (and the
median). The clusters are started and warmed once before timing (their cold start, including
worker imports, is reported separately), and each timed fit has a new fit token, so workers read
their frames again. Throughput = frame pixels (N x H x W) / fit wall time. ``max_rel_diff``
compares every merged root statistic (n, mean, M2, min, max) with the in-process one.

Usage::

    .venv/bin/python bench/sharded.py                 # full run (~3 min on 2 cores)
    .venv/bin/python bench/sharded.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads_inprocess": torch.get_num_threads(), "commit": commit,
            "loadavg_at_start": os.getloadavg()}


def write_frames(directory: Path, n: int, size: int, channels: int, compressed: bool,
                 seed: int) -> list[Path]:
    import numpy as np

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
    from nodes.presets import build_channel_selector_pipeline

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


def run_sharded(task_map: Any, paths: list[Path], kind: str, channels: int, batch: int,
                n_shards: int) -> dict[str, Any]:
    import torch

    from nodes import StatisticalTrainer
    from nodes.sharding import ShardDataSpec, ShardedPassRunner

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
    """In-process, 1 and 2 Dask workers, interleaved ``args.repeats`` times."""
    runs: dict[str, list[dict[str, Any]]] = {"inprocess": [], "dask_1": [], "dask_2": []}
    for _ in range(args.repeats):
        runs["inprocess"].append(run_inprocess(paths, kind, args.channels, args.batch_size))
        for n in (1, 2):
            runs[f"dask_{n}"].append(run_sharded(maps[n], paths, kind, args.channels,
                                                 args.batch_size, n))
    ref = runs["inprocess"][0]["moments"]
    diff = max(rel_diff(r["moments"][root], ref[root])
               for rs in runs.values() for r in rs for root in ref)
    entry: dict[str, Any] = {"cubes": len(paths), "passes": runs["inprocess"][0]["passes"],
                             "max_rel_diff": diff}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        best = min(range(len(rs)), key=lambda i: secs[i])
        entry[name] = {"best_s": round(secs[best], 3),
                       "median_s": round(statistics.median(secs), 3),
                       "mpix_s": round(n_pix / secs[best] / 1e6, 2)}
        if name == "inprocess":
            entry[name]["read_validate_s"] = round(rs[best]["read_s"], 3)
            entry[name]["passes_s"] = round(rs[best]["passes_s"], 3)
        else:
            entry[name]["breakdown"] = rs[best]["breakdown"]
    base = entry["inprocess"]["best_s"]
    entry["speedup_1_worker"] = round(base / entry["dask_1"]["best_s"], 3)
    entry["speedup_2_workers"] = round(base / entry["dask_2"]["best_s"], 3)
    entry["speedup_2_workers_median"] = round(
        entry["inprocess"]["median_s"] / entry["dask_2"]["median_s"], 3)
    return entry


def report_line(kind: str, entry: dict[str, Any]) -> None:
    orch = [p["orchestration_s"] for p in entry["dask_2"]["breakdown"]]
    print(f"  {kind:6s} ({entry['passes']} pass(es)): in-process "
          f"{entry['inprocess']['mpix_s']} Mpix/s, dask 1 worker {entry['dask_1']['mpix_s']}, "
          f"2 workers {entry['dask_2']['mpix_s']} -> speedup x{entry['speedup_2_workers']} "
          f"(median x{entry['speedup_2_workers_median']}); orchestration per pass (2 workers) "
          f"{orch} s; max rel diff {entry['max_rel_diff']:.2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cubes", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--channels", type=int, default=61)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="plain,compressed")
    ap.add_argument("--pipelines", default="chain,preset")
    ap.add_argument("--scale", default="64,128",
                    help="extra cube counts for plain/chain (how the per-pass cost amortizes)")
    ap.add_argument("--quick", action="store_true", help="8 small cubes, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.cubes, args.size, args.repeats, args.scale = 8, 64, 1, "16"

    from tasks.env import disable_telemetry

    disable_telemetry()
    from tasks.sharding import TaskRunnerMap, _shard_key, _worker_api_url, dask_task_runner

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; "
          f"load {info['loadavg_at_start']}", flush=True)
    t = time.perf_counter()
    api = _worker_api_url()
    api_start_s = time.perf_counter() - t
    print(f"Prefect API {api} ready in {api_start_s:.1f} s", flush=True)

    maps = {n: TaskRunnerMap(lambda url, n=n: dask_task_runner(None, n, url), kind="dask",
                             affinity=_shard_key) for n in (1, 2)}
    root = Path(tempfile.mkdtemp(prefix="cubeline-sharded-"))
    n_pix = args.cubes * args.size * args.size
    results: dict[str, Any] = {}
    try:
        cold: dict[str, float] = {}
        for fmt in args.formats.split(","):
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
            for kind in args.pipelines.split(","):
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
    head_key = next(iter(results))
    head = results[head_key]
    out = {
        "bench": "sharded_phase1",
        "headline": head_key,
        "max_rel_diff": max(r["max_rel_diff"] for r in results.values()),
        "speedup_2_workers": head["speedup_2_workers"],
        "speedup_1_worker": head["speedup_1_worker"],
        "inprocess_mpix_s": head["inprocess"]["mpix_s"],
        "dask_1_worker_mpix_s": head["dask_1"]["mpix_s"],
        "dask_2_workers_mpix_s": head["dask_2"]["mpix_s"],
        "target_speedup": 1.6,
        "cubes": args.cubes, "shape": [args.size, args.size, args.channels],
        "batch_size": args.batch_size, "repeats": args.repeats,
        "prefect_api_start_s": round(api_start_s, 2), "cold_start_s": cold,
        "results": results, "machine": info,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
