"""Phase-2 epoch time and pixels/s: normalizer → selector → RX → logit head, BCE, AdamW.

Runs on the CPU or on GPUs (``--accelerator gpu --devices 2`` uses Lightning's DDP) for the same
data: ``--data synthetic`` (16+ seeded cubes 256 x 256 x 61) or ``--data session`` (the bundled
five Los Angeles scenes, C = 205). Prints one JSON object on its last line (rank 0 only).

    python bench/phase2_speed.py --data synthetic --accelerator cpu
    python bench/phase2_speed.py --data session --accelerator gpu --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import lightning as L
import torch
from synthetic import make_cubes

from nodes import GradientTrainer, StatisticalTrainer
from nodes.data import CubeDataModule
from nodes.library.presets import build_channel_selector_pipeline
from nodes.training.config import OptimizerConfig, SchedulerConfig, TrainerConfig

if TYPE_CHECKING:
    from nodes import AnomalyDetectionMetrics, Node


class EpochTimer(L.Callback):
    """Wall time of each training epoch (synchronized on CUDA)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def build_data(kind: str, n_cubes: int, batch_size: int) -> tuple[CubeDataModule, int, int]:
    if kind == "synthetic":
        cubes, masks = make_cubes(n_cubes, 256, 61, seed=0)
        n_train = n_cubes - 4
        dm = CubeDataModule.from_arrays(cubes, masks, train_ids=list(range(n_train)),
                                        val_ids=[n_train, n_train + 1],
                                        test_ids=[n_train + 2, n_train + 3],
                                        batch_size=batch_size, seed=0)
        return dm, 61, n_train * 256 * 256
    root = Path(__file__).resolve().parents[1] / "data" / "session"
    paths = sorted(root.glob("*.mat"))
    dm = CubeDataModule(paths, train_ids=[0, 1, 2], val_ids=[3], test_ids=[4],
                        batch_size=batch_size)
    return dm, 205, 3 * 100 * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", choices=["synthetic", "session"], default="synthetic")
    ap.add_argument("--n-cubes", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    dm, channels, train_pixels = build_data(args.data, args.n_cubes, args.batch_size)
    pipe = build_channel_selector_pipeline(input_channels=channels, n_select=10, eps=1e-6)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.accelerator == "gpu" and torch.cuda.is_available()
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    pipe.to(device)
    t0 = time.perf_counter()
    StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    phase1_s = time.perf_counter() - t0
    pipe.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    timer = EpochTimer()
    cfg = TrainerConfig(max_epochs=args.epochs, accelerator=args.accelerator,
                        devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto",
                        enable_progress_bar=False,
                        default_root_dir=os.environ.get("BENCH_ROOT", "/tmp/cubeline-bench"))
    losses = [cast("Node", pipe.nodes["bce"])]
    metrics = [cast("AnomalyDetectionMetrics", pipe.nodes["metrics_anomaly"])]
    gt = GradientTrainer(pipe, dm, losses, metrics, cfg,
                         OptimizerConfig(name="adamw", lr=args.lr, weight_decay=1e-4),
                         SchedulerConfig(name="reduce_on_plateau", monitor="metrics_anomaly/iou",
                                         mode="max", factor=0.5, patience=5),
                         seed=42, callbacks=[timer])
    gt.fit()
    test = gt.test()
    rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if rank != 0:
        return
    steady = timer.times[1:] or timer.times
    epoch_s = statistics.median(steady)
    result = {
        "data": args.data,
        "accelerator": args.accelerator,
        "devices": args.devices,
        "device_name": torch.cuda.get_device_name(0) if use_cuda else "cpu",
        "channels": channels,
        "train_pixels": train_pixels,
        "phase1_s": round(phase1_s, 3),
        "epoch_times_s": [round(t, 4) for t in timer.times],
        "epoch_s_median": round(epoch_s, 4),
        "train_mpix_per_s": round(train_pixels / epoch_s / 1e6, 3),
        "test": {k: round(v, 4) for k, v in test.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
