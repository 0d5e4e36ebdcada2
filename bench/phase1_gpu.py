"""Phase 1 and RX scoring on CUDA, and Phase 1 across DDP ranks.

Single process (``python bench/phase1_gpu.py``; from a bare checkout without the package
installed, as on the lent GPU machine, ``PYTHONPATH=. python bench/phase1_gpu.py``): Phase 1 of
normalizer → selector → RX at C = 61 from device-resident batches and end to end from
pinned host memory, plus RX scoring throughput
at C = 61 and C = 205. Under ``torchrun --nproc_per_node 2``: every rank folds in its shard of
the batches, the moment states are all-gathered and merged, and rank 0 compares the result with a
single-process fit of the same data. Prints one JSON object on its last line.

Besides the fit: the pass alone and the rest of the fit (``phase1_pass_only_gpix_s``,
``phase1_fit_minus_pass_ms``), the accumulator alone on its fused and torch paths, and the fused
path's largest relative difference from the float64 CPU path. ``--sweep`` times the fused
kernel's launch settings; ``--profile`` prints a torch.profiler table of one fit.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from collections.abc import Callable
from typing import cast

import torch
from phase1 import chain  # the same Phase-1 chain as the CPU benchmark
from synthetic import TensorBatches, make_cubes_torch

from nodes import RXGlobal, StatisticalTrainer
from nodes.training.stats import MomentAccumulator, MomentState


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[..., object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def single(args: argparse.Namespace) -> dict[str, object]:
    dev = args.device
    cubes = make_cubes_torch(args.n_cubes, 256, 61, seed=0, device=dev)
    pixels = cubes.shape[0] * 256 * 256
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    out: dict[str, object] = {"device_name": name,
                              "pixels": pixels, "n_cubes": args.n_cubes}
    for chunk in (1 << 16, 1 << 18, 1 << 20, 1 << 22):
        p = chain(61).to(dev)
        trainer = StatisticalTrainer(pipeline=p, datamodule=TensorBatches(cubes, 16),
                                     chunk_pixels=chunk)
        t = timed(trainer.fit)
        out[f"phase1_resident_gpix_s_chunk{chunk}"] = round(pixels / t / 1e9, 3)
    # where a fit's time goes: its pass alone (forward + accumulate) and the rest (node fits)
    p = chain(61).to(dev)
    trainer = StatisticalTrainer(pipeline=p, datamodule=TensorBatches(cubes, 16))
    t_fit = timed(trainer.fit)
    t_pass = timed(lambda: trainer._run_pass(["data.cube"]))
    out["phase1_pass_only_gpix_s"] = round(pixels / t_pass / 1e9, 3)
    out["phase1_fit_minus_pass_ms"] = round((t_fit - t_pass) * 1e3, 3)
    # the accumulator alone over the same batches (fresh state each time, as a fit has)
    batches = [cubes[i : i + 16].reshape(-1, 61) for i in range(0, cubes.shape[0], 16)]
    paths: list[tuple[str, dict[str, bool]]] = [("", {})]
    if "fused" in inspect.signature(MomentAccumulator).parameters:  # absent before the kernel
        paths.append(("_torch_path", {"fused": False}))
    for label, kw in paths:
        def accumulate(kw: dict[str, bool] = kw) -> None:
            acc = MomentAccumulator(61, device=dev, **kw)
            for b in batches:
                acc.update(b)
            acc.finalize()
        t = timed(accumulate)
        out[f"accumulator_resident_gpix_s{label}"] = round(pixels / t / 1e9, 3)
    if dev == "cuda":
        out.update(fused_vs_cpu(cubes))
    # raw GEMM bound: one float64 X^T X over the same pixels
    x = cubes.reshape(-1, 61).double()
    t = timed(lambda x=x: x.T @ x)
    out["xtx_f64_gpix_s"] = round(pixels / t / 1e9, 3)
    del x
    # end to end: cubes in pinned host memory, copied per batch
    host = cubes.cpu().pin_memory() if dev == "cuda" else cubes.cpu()
    p = chain(61).to(dev)
    trainer = StatisticalTrainer(pipeline=p, datamodule=TensorBatches(host, 16))
    t = timed(trainer.fit)
    out["phase1_from_pinned_host_gpix_s"] = round(pixels / t / 1e9, 3)
    # RX scoring
    for c in (61, 205):
        data = make_cubes_torch(8, 256, c, seed=1, device=dev)
        rx = RXGlobal(num_channels=c, eps=1e-6).to(dev)
        rx.fit_from_moments(MomentState.from_samples(data.reshape(-1, c)))
        with torch.no_grad():
            t = timed(lambda rx=rx, data=data: rx(data=data))
        out[f"rx_score_c{c}_gpix_s"] = round(data.shape[0] * 256 * 256 / t / 1e9, 3)
    return out


def fused_vs_cpu(cubes: torch.Tensor) -> dict[str, object]:
    """Largest relative difference of the CUDA accumulator's state from the float64 CPU path."""
    x = cubes[:16].reshape(-1, cubes.shape[-1])
    cpu = MomentState.from_samples(x.cpu())
    gpu = MomentState.from_samples(x).to("cpu")

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    return {"accumulator_vs_cpu_max_rel_diff": max(rel(gpu.m2, cpu.m2), rel(gpu.mean, cpu.mean)),
            "accumulator_vs_cpu_minmax_equal": bool(torch.equal(gpu.min, cpu.min)
                                                     and torch.equal(gpu.max, cpu.max))}


def sweep(args: argparse.Namespace) -> dict[str, object]:
    """Time the fused kernel's launch settings on one batch of 16 cubes (C = 61)."""
    from nodes.training import stats_cuda

    x = make_cubes_torch(16, 256, 61, seed=0, device="cuda").reshape(-1, 61)
    shift = x[:4096].double().mean(0)
    res: dict[str, object] = {}
    configs = [(bn, w, p, pf) for bn in (16, 32) for w in (2, 4) for p in (2, 4, 8)
               for pf in (False, True)] + [(64, 4, 2, False), (64, 8, 1, True), (64, 8, 2, True)]
    for block_n, warps, per_sm, prefetch in configs:
        def run(block_n: int = block_n, warps: int = warps, per_sm: int = per_sm,
                prefetch: bool = prefetch) -> None:
            stats_cuda.moment_sums(x, shift, block_n=block_n, num_warps=warps,
                                   programs_per_sm=per_sm, prefetch=prefetch)
        key = f"bn{block_n}_w{warps}_p{per_sm}_pf{int(prefetch)}"
        try:
            run()
            t = timed(run, repeats=10)
        except Exception as e:  # a setting that does not compile
            res[key] = type(e).__name__
            continue
        res[key] = round(x.shape[0] / t / 1e9, 3)
    return res


def profile_fit(args: argparse.Namespace) -> None:
    """Print a torch.profiler table of one resident Phase-1 fit (after a warm-up fit)."""
    from torch.profiler import ProfilerActivity, profile

    cubes = make_cubes_torch(args.n_cubes, 256, 61, seed=0, device="cuda")
    p = chain(61).to("cuda")
    trainer = StatisticalTrainer(pipeline=p, datamodule=TensorBatches(cubes, 16))
    trainer.fit()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.fit()
        sync()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if args.trace:
        prof.export_chrome_trace(args.trace)


def distributed(args: argparse.Namespace) -> dict[str, object] | None:
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    dev = f"cuda:{rank}"
    cubes = make_cubes_torch(args.n_cubes, 256, 61, seed=0, device=dev)  # same data everywhere
    p = chain(61).to(dev)
    trainer = StatisticalTrainer(pipeline=p, datamodule=TensorBatches(cubes, 4))
    t = timed(trainer.fit)
    rx = cast(RXGlobal, p.nodes["rx"])
    mu = rx.mu.detach().clone()
    gathered = [torch.empty_like(mu) for _ in range(world)]
    dist.all_gather(gathered, mu)
    result: dict[str, object] | None = None
    if rank == 0:
        dist.destroy_process_group()
        ref = chain(61).to(dev)
        report = StatisticalTrainer(pipeline=ref, datamodule=TensorBatches(cubes, 4)).fit()
        ref_rx = cast(RXGlobal, ref.nodes["rx"])
        rel = max(
            float((rx.sigma - ref_rx.sigma).abs().max() / ref_rx.sigma.abs().max()),
            float((mu - ref_rx.mu).abs().max() / ref_rx.mu.abs().max()),
        )
        result = {
            "world_size": world,
            "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
            "max_rel_diff_vs_single_process": rel,
            "ddp_phase1_gpix_s": round(cubes.shape[0] * 256 * 256 / t / 1e9, 3),
            "pixels_single": report.pixels,
        }
    else:
        dist.destroy_process_group()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-cubes", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sweep", action="store_true", help="time the fused kernel's settings")
    ap.add_argument("--profile", action="store_true", help="profile one resident fit")
    ap.add_argument("--trace", default="", help="with --profile: write a Chrome trace here")
    args = ap.parse_args()
    if args.sweep:
        print(json.dumps(sweep(args)))
        return
    if args.profile:
        profile_fit(args)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        res = distributed(args)
        if res is not None:
            print(json.dumps(res))
        return
    print(json.dumps(single(args)))


if __name__ == "__main__":
    main()
