"""The accumulator contract and the shared binned curve (nodes/accumulators.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from nodes.accumulators import Accumulator, BinnedCurve, count_slots, sample_edges
from nodes.library.metrics import BinnedScoreCounts
from nodes.training.stats import MomentAccumulator
from nodes.training.threshold import ScoreHistogram


def _scores(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(n, generator=g) < 0.05
    scores = torch.randn(n, generator=g, dtype=torch.float64) * 3 + 4.0 * targets
    return scores, targets


def _make(kind: str) -> Any:
    return {
        "moments": lambda: MomentAccumulator(3),
        "histogram": lambda: ScoreHistogram(-20.0, 20.0, 512),
        "metric": lambda: BinnedScoreCounts(-20.0, 20.0, 512),
    }[kind]()


def _feed(acc: Any, kind: str, seed: int) -> None:
    scores, targets = _scores(4000, seed)
    if kind == "moments":
        acc.update(torch.stack([scores, scores**2, -scores], dim=1).float())
    else:
        acc.update(scores, targets)


def _result(acc: Any, kind: str) -> list[torch.Tensor]:
    if kind == "moments":
        st = acc.compute()
        return [st.mean, st.m2, st.n]
    if kind == "histogram":
        return [acc.counts_normal, acc.counts_anomalous]
    return [acc.normal, acc.anomalous]


@pytest.mark.parametrize("kind", ["moments", "histogram", "metric"])
def test_every_accumulator_follows_one_contract(kind: str) -> None:
    whole, a, b = _make(kind), _make(kind), _make(kind)
    assert isinstance(whole, Accumulator)
    _feed(whole, kind, 1)
    _feed(whole, kind, 2)
    _feed(a, kind, 1)
    _feed(b, kind, 2)
    assert a.merge(b) is a  # merge is in place and chains
    for x, y in zip(_result(a, kind), _result(whole, kind), strict=True):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-12, atol=1e-9)
    a.reset()
    empty = _make(kind)
    for x, y in zip(_result(a, kind), _result(empty, kind), strict=True):
        assert torch.equal(x, y) or (torch.isnan(x).all() and torch.isnan(y).all())


@pytest.mark.parametrize("kind", ["moments", "histogram"])
def test_state_dict_round_trips(kind: str) -> None:
    acc, back = _make(kind), _make(kind)
    _feed(acc, kind, 3)
    back.load_state_dict(acc.state_dict())
    for x, y in zip(_result(acc, kind), _result(back, kind), strict=True):
        assert torch.equal(x, y)


def test_count_slots_puts_edges_in_the_bin_they_open() -> None:
    edges = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    scores = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 7.0], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1, 0, 1])
    normal, anomalous = count_slots(scores, targets, edges)
    assert normal.tolist() == [1, 1, 0, 1]
    assert anomalous.tolist() == [0, 1, 1, 1]


def test_binned_curve_is_close_to_the_exact_oracle() -> None:
    scores, targets = _scores(200_000, 5)
    curve = BinnedCurve.from_samples(scores.numpy(), targets.numpy())
    assert curve.auroc() == pytest.approx(roc_auc_score(targets, scores), abs=1e-4)
    assert curve.average_precision() == pytest.approx(
        average_precision_score(targets, scores), abs=1e-3
    )


def test_metric_and_histogram_share_the_curve() -> None:
    scores, targets = _scores(50_000, 7)
    hist, metric = ScoreHistogram(-20.0, 20.0, 1024), BinnedScoreCounts(-20.0, 20.0, 1024)
    hist.update(scores, targets)
    metric.update(scores, targets)
    out = metric.compute()
    curve = hist.curve()
    assert float(out["auroc"]) == pytest.approx(curve.auroc(), abs=1e-6)
    assert float(out["ap"]) == pytest.approx(curve.average_precision(), abs=1e-6)
    assert float(out["auroc"]) == pytest.approx(roc_auc_score(targets, scores), abs=2e-3)


def test_sample_edges_are_increasing_and_span_the_scores() -> None:
    s = np.concatenate([np.zeros(1000), np.linspace(0, 5, 10)])
    edges = sample_edges(s, 64)
    assert np.all(np.diff(edges) > 0)
    assert edges[0] == 0.0 and edges[-1] == 5.0
    assert sample_edges(np.ones(5), 8).tolist() == [1.0, 2.0]
