"""Phase 1 and RX scoring on CUDA, and Phase 1 across DDP ranks.

Single process (``python bench/phase1_gpu.py``): Phase 1 of normalizer → selector → RX at C = 61
from device-resident batches and end to end from pinned host memory, plus RX scoring throughput
at C = 61 and C = 205. Under ``torchrun --nproc_per_node 2``: every rank folds in its shard of
the batches, the moment states are all-gathered and merged, and rank 0 compares the result with a
single-process fit of the same data. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from synthetic import TensorBatches, make_cubes_torch

from nodes import (
    AnomalyDataNode,
    MinMaxNormalizer,
    Pipeline,
    RXGlobal,
    SoftChannelSelector,
    StatisticalTrainer,
)
from nodes.stats import MomentState


def chain(c: int, n_select: int = 10) -> Pipeline:
    p = Pipeline("phase1")
    d = AnomalyDataNode(name="data")
    norm = MinMaxNormalizer(name="normalizer")
    sel = SoftChannelSelector(n_select=n_select, input_channels=c, name="selector")
    rx = RXGlobal(num_channels=n_select, name="rx")
    p.connect((d.cube, norm.data), (norm.normalized, sel.data), (sel.selected, rx.data))
    return p


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
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
    mu = p.nodes["rx"].mu.detach().clone()
    gathered = [torch.empty_like(mu) for _ in range(world)]
    dist.all_gather(gathered, mu)
    result = None
    if rank == 0:
        dist.destroy_process_group()
        ref = chain(61).to(dev)
        report = StatisticalTrainer(pipeline=ref, datamodule=TensorBatches(cubes, 4)).fit()
        rel = max(
            float((p.nodes["rx"].sigma - ref.nodes["rx"].sigma).abs().max()
                   / ref.nodes["rx"].sigma.abs().max()),
            float((mu - ref.nodes["rx"].mu).abs().max() / ref.nodes["rx"].mu.abs().max()),
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
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        res = distributed(args)
        if res is not None:
            print(json.dumps(res))
        return
    print(json.dumps(single(args)))


if __name__ == "__main__":
    main()
