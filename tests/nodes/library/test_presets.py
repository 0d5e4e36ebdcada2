"""Ready-made pipelines (nodes/library/presets.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from nodes import (
    AnomalyBCEWithLogits,
    AnomalyDetectionMetrics,
    BinaryDecider,
    MinMaxNormalizer,
    RXGlobal,
    ScoreToLogit,
    SoftChannelSelector,
    StatisticalTrainer,
)
from nodes.data import CubeDataModule
from nodes.library.presets import build_channel_selector_pipeline


def test_channel_selector_preset_wiring() -> None:
    pipe = build_channel_selector_pipeline(input_channels=61, n_select=10, eps=1e-3,
                                           bce_weight=3.0, threshold=0.7)
    assert list(pipe.topological_order()) == [
        "data", "normalizer", "selector", "rx", "logit_head", "bce", "decider", "metrics_anomaly",
    ]
    assert isinstance(pipe.nodes["normalizer"], MinMaxNormalizer)
    sel, rx = pipe.nodes["selector"], pipe.nodes["rx"]
    assert isinstance(sel, SoftChannelSelector) and sel.input_channels == 61
    assert isinstance(rx, RXGlobal) and rx.num_channels == 10 and rx.eps == 1e-3
    assert isinstance(pipe.nodes["logit_head"], ScoreToLogit)
    decider, bce = pipe.nodes["decider"], pipe.nodes["bce"]
    assert isinstance(decider, BinaryDecider) and isinstance(bce, AnomalyBCEWithLogits)
    assert float(decider.threshold) == pytest.approx(0.7)
    assert bce.weight == 3.0
    edges = {str(e) for e in pipe.edges}
    # Unlike the guide's wiring, the metric node also sees the logits (threshold-free AP/AUROC).
    assert "logit_head.logits -> metrics_anomaly.logits" in edges
    assert "data.mask -> metrics_anomaly.targets" in edges
    assert "data.mask -> bce.targets" in edges


def test_preset_fits_and_validates(make_dm: Callable[..., Any], cubes: Any) -> None:
    pipe = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    trainer = StatisticalTrainer(pipeline=pipe, datamodule=make_dm(val_ids=[3, 4]))
    report = trainer.fit()
    assert report.passes == 2  # normalizer → selector → RX in one, the logit head in another
    results = trainer.validate()
    assert results["metrics_anomaly/auroc"] > 0.9  # planted targets are found
    assert isinstance(pipe.nodes["metrics_anomaly"], AnomalyDetectionMetrics)


def test_preset_on_the_bundled_session(session_paths: list[Path], auc: Callable[..., float]
                                       ) -> None:
    dm = CubeDataModule(session_paths, train_ids=[0, 1, 2], val_ids=[3], test_ids=[4],
                        batch_size=2)
    pipe = build_channel_selector_pipeline(input_channels=205, n_select=10)
    trainer = StatisticalTrainer(pipeline=pipe, datamodule=dm)
    report = trainer.fit()
    assert report.pixels == 30_000
    results = trainer.validate()
    batch = next(iter(dm.val_dataloader()))
    logits = pipe.forward(batch=batch)["logit_head.logits"]
    exact = auc(logits.double().numpy(), batch["mask"].numpy())
    # The binned AUROC of the metric node agrees with the exact rank AUROC of its logits.
    assert results["metrics_anomaly/auroc"] == pytest.approx(exact, abs=2e-3)
    assert torch.isfinite(logits).all()
