"""Pixel metrics in bounded memory (nodes/library/metrics.py), against numpy and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics import Metric

from nodes import AnomalyDetectionMetrics


def _case(seed: int = 0, n: int = 20_000, rate: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-spread logits (|logit| well inside the metric's grid) and ~5 % anomalies."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(n, generator=g) < rate
    logits = torch.randn(n, generator=g) * 3.0 + targets.float() * 4.0 - 2.0
    return logits.reshape(1, -1, 100), targets.reshape(1, -1, 100)


def _numpy_counts(d: np.ndarray, t: np.ndarray) -> dict[str, float]:
    tp = float(np.sum(d & t))
    fp = float(np.sum(d & ~t))
    fn = float(np.sum(~d & t))
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return {
        "iou": tp / (tp + fp + fn),
        "f1": 2 * precision * recall / (precision + recall),
        "precision": precision,
        "recall": recall,
    }


def _states_numel(m: AnomalyDetectionMetrics) -> int:
    """Elements held in every torchmetrics state of the node (list states count per item)."""
    total = 0
    for metric in m.modules():
        if isinstance(metric, Metric):
            for v in metric.metric_state.values():
                items = v if isinstance(v, list) else [v]
                total += sum(int(t.numel()) for t in items)
    return total


def test_counts_equal_numpy_reference() -> None:
    logits, targets = _case()
    decisions = logits >= 0.7
    m = AnomalyDetectionMetrics(name="metrics_anomaly")
    m(decisions=decisions, targets=targets, logits=logits)
    got = m.compute()
    ref = _numpy_counts(decisions.numpy().reshape(-1), targets.numpy().reshape(-1))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert set(got) == {"iou", "f1", "precision", "recall", "ap", "auroc"}


def test_ap_and_auroc_match_exact_values_on_well_spread_logits() -> None:
    logits, targets = _case(1)
    m = AnomalyDetectionMetrics()
    m(decisions=logits >= 0, targets=targets, logits=logits)
    got = m.compute()
    y, s = targets.numpy().reshape(-1), logits.double().numpy().reshape(-1)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-3)


def test_batches_accumulate_like_one_update() -> None:
    logits, targets = _case(2)
    one, many = AnomalyDetectionMetrics(), AnomalyDetectionMetrics()
    one(decisions=logits >= 0, targets=targets, logits=logits)
    for lo in range(0, 200, 40):
        sl = slice(lo, lo + 40)
        many(decisions=logits[:, sl] >= 0, targets=targets[:, sl], logits=logits[:, sl])
    assert one.compute() == many.compute()


def test_state_memory_does_not_grow_with_updates() -> None:
    m = AnomalyDetectionMetrics()
    logits, targets = _case(3)
    m(decisions=logits >= 0, targets=targets, logits=logits)
    after_one = _states_numel(m)
    for seed in range(49):
        lg, tg = _case(100 + seed, n=2000)
        m(decisions=lg >= 0, targets=tg, logits=lg)
    assert _states_numel(m) == after_one
    # And it is small: a fixed threshold grid, not the pixels (20k + 49 x 2k seen).
    assert after_one < 20_000


def test_reset_clears_the_state() -> None:
    logits, targets = _case(4)
    m = AnomalyDetectionMetrics()
    m(decisions=logits >= 0, targets=targets, logits=logits)
    first = m.compute()
    m(decisions=~(logits >= 0), targets=targets, logits=-logits)
    assert m.compute() != first
    m.reset()
    m(decisions=logits >= 0, targets=targets, logits=logits)
    assert m.compute() == first


def test_ap_and_auroc_from_decisions_only() -> None:
    """Without logits (the guide's wiring), AP/AUROC are those of the one operating point."""
    logits, targets = _case(5)
    decisions = logits >= 0.5
    m = AnomalyDetectionMetrics()
    m(decisions=decisions, targets=targets)
    got = m.compute()
    y, d = targets.numpy().reshape(-1), decisions.numpy().reshape(-1).astype(float)
    # One operating point: the ROC is (0,0) - (FPR, TPR) - (1,1); AUROC = (TPR + TNR) / 2.
    assert got["auroc"] == pytest.approx(roc_auc_score(y, d), abs=1e-3)
    assert got["ap"] == pytest.approx(average_precision_score(y, d), abs=1e-2)


def test_one_class_only_gives_nan_ap_auroc() -> None:
    m = AnomalyDetectionMetrics()
    z = torch.zeros(1, 4, 4, dtype=torch.bool)
    m(decisions=z, targets=z, logits=torch.zeros(1, 4, 4))
    got = m.compute()
    assert math.isnan(got["ap"]) and math.isnan(got["auroc"])
    assert got["iou"] == 0.0 and got["precision"] == 0.0 and got["recall"] == 0.0


def test_metric_node_runs_only_in_val_and_test() -> None:
    m = AnomalyDetectionMetrics()
    assert m.execution_stages == frozenset({"val", "test"})
    assert m.name == "metrics_anomaly"
