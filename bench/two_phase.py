"""Phase 1 alone vs Phase 1 + Phase 2 on the bundled session (the reference guide's example).

Train airport-1..3, validate on urban-4, test on urban-5: normalizer → soft channel selector →
RX → logit head, BCE, AdamW, ReduceLROnPlateau. Both phases are scored on the test frame at a
decision threshold calibrated on the validation frame (max F1), plus threshold-free AP/AUROC.
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

from nodes import GradientTrainer, StatisticalTrainer
from nodes.data import CubeDataModule
from nodes.library.presets import build_channel_selector_pipeline
from nodes.training.config import OptimizerConfig, SchedulerConfig, TrainerConfig
from nodes.training.statistical_trainer import evaluate_pipeline

if TYPE_CHECKING:
    from nodes import AnomalyDetectionMetrics, Node

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    paths = sorted((ROOT / "data" / "session").glob("*.mat"))
    dm = CubeDataModule(paths, train_ids=[0, 1, 2], val_ids=[3], test_ids=[4], batch_size=1)
    pipe = build_channel_selector_pipeline(input_channels=205, n_select=10, eps=1e-6)
    t0 = time.perf_counter()
    StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    phase1_s = time.perf_counter() - t0
    trainer_cfg = TrainerConfig(max_epochs=args.epochs, accelerator="cpu",
                                default_root_dir="/tmp/cubeline-two-phase")
    losses = [cast("Node", pipe.nodes["bce"])]
    metrics = [cast("AnomalyDetectionMetrics", pipe.nodes["metrics_anomaly"])]
    # Phase 1 alone, with the same threshold calibration as after Phase 2.
    GradientTrainer(pipe, dm, losses, metrics, trainer_cfg).calibrate_threshold()
    dm.setup("test")
    phase1 = evaluate_pipeline(pipe, dm.test_dataloader(), stage="test")
    pipe.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    gt = GradientTrainer(
        pipe, dm, losses, metrics, trainer_cfg,
        OptimizerConfig(name="adamw", lr=args.lr, weight_decay=1e-4),
        SchedulerConfig(name="reduce_on_plateau", monitor="metrics_anomaly/iou", mode="max",
                        factor=0.5, patience=5),
        seed=args.seed,
    )
    t0 = time.perf_counter()
    gt.fit()
    phase2_s = time.perf_counter() - t0
    phase2 = {k: v for k, v in gt.test().items() if k.startswith("metrics_anomaly/")}

    def pick(m: dict[str, float]) -> dict[str, float]:
        return {k.split("/")[1]: round(v, 4) for k, v in m.items()
                if k.split("/")[1] in ("iou", "f1", "ap", "auroc")}

    p1, p2 = pick(phase1), pick(phase2)
    print(json.dumps({
        "machine": "cpu",
        "epochs": args.epochs,
        "phase1_s": round(phase1_s, 3),
        "phase2_s": round(phase2_s, 2),
        "phase1_test": p1,
        "phase2_test": p2,
        "phase2_beats_phase1_ap": p2["ap"] > p1["ap"],
        "phase2_beats_phase1_f1": p2["f1"] > p1["f1"],
    }))


if __name__ == "__main__":
    main()
