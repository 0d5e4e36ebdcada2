from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nodes.errors import ConfigError, DataValidationError
from nodes.training.threshold import (
    ScoreHistogram,
    ThresholdCalibration,
    calibrate_threshold,
    logit_to_probability,
    probability_to_logit,
    threshold_at_fpr,
    threshold_at_max_f1,
)

# ---------------------------------------------------------------- fixtures and brute force


def make_scores(
    seed: int, shape: tuple[int, ...] = (4, 40, 50), frac: float = 0.03, shift: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-like scores: N(0, 1.5) background, planted anomalies shifted up by ``shift``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g) * 1.5 - 2.0
    mask = torch.rand(shape, generator=g) < frac
    scores[mask] += shift + torch.rand(int(mask.sum()), generator=g) * 2
    return scores, mask


def brute_fpr(scores: np.ndarray, mask: np.ndarray, t: float) -> float:
    normal = scores[~mask]
    return float((normal >= t).sum() / normal.size)


def brute_f1(scores: np.ndarray, mask: np.ndarray, t: float) -> float:
    flagged = scores >= t
    tp = float((flagged & mask).sum())
    fp = float((flagged & ~mask).sum())
    return 2 * tp / (tp + fp + mask.sum())


def brute_max_f1(scores: np.ndarray, mask: np.ndarray) -> float:
    """Exact max F1 over every threshold, via the sorted scores."""
    scores, mask = scores.ravel(), mask.ravel()
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], mask[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    # only cut between distinct scores: a threshold cannot split equal scores
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    f1 = 2 * tp / (tp + fp + y.sum())
    return float(f1[last_of_tie].max())


def critical_normal_score(scores: np.ndarray, mask: np.ndarray, target: float) -> float:
    """The largest normal score that a threshold meeting ``target`` must leave unflagged."""
    normal = np.sort(scores[~mask])[::-1]
    allowed = math.floor(target * normal.size + 1e-9)
    return float(normal[allowed]) if allowed < normal.size else -math.inf


def filled(scores: torch.Tensor, mask: torch.Tensor, **kw: float) -> ScoreHistogram:
    hist = ScoreHistogram(**kw)  # type: ignore[arg-type]
    hist.update(scores, mask)
    return hist


# ---------------------------------------------------------------- histogram


def test_counts_match_numpy_histogram() -> None:
    scores, mask = make_scores(0)
    hist = filled(scores, mask, low=-8.0, high=8.0, n_bins=64)
    s = scores.double().numpy()
    m = mask.numpy()
    edges = hist.edges.numpy()
    expected_normal, _ = np.histogram(s[~m], bins=edges)
    # numpy closes the last bin on the right; our top edge belongs to the overflow instead
    assert not np.any(s == edges[-1])
    np.testing.assert_array_equal(hist.counts_normal[1:-1].numpy(), expected_normal)
    assert hist.n_normal == int((~m).sum()) and hist.n_anomalous == int(m.sum())
    assert hist.counts_normal.dtype == torch.float64


def test_out_of_range_scores_go_to_under_and_overflow() -> None:
    scores = torch.tensor([-100.0, -1.0, 0.5, 1.0, 2.0, 99.0])
    mask = torch.tensor([False, False, False, True, True, True])
    hist = filled(scores, mask, low=-1.0, high=2.0, n_bins=3)
    # slots: <-1 | [-1,0) | [0,1) | [1,2) | >=2 (edge values go to the bin they open)
    assert hist.counts_normal.tolist() == [1, 1, 1, 0, 0]
    assert hist.counts_anomalous.tolist() == [0, 0, 0, 1, 2]
    assert hist.n_out_of_range == 3


def test_merge_equals_one_pass_and_state_round_trip() -> None:
    scores, mask = make_scores(1)
    whole = filled(scores, mask)
    parts = [ScoreHistogram() for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(scores[i::3], mask[i::3])
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert torch.equal(merged.counts_normal, whole.counts_normal)
    assert torch.equal(merged.counts_anomalous, whole.counts_anomalous)
    # through a plain tensor state, as between processes
    state = whole.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = ScoreHistogram.from_state_dict(state)
    assert (back.low, back.high, back.n_bins) == (whole.low, whole.high, whole.n_bins)
    assert torch.equal(back.counts_normal, whole.counts_normal)
    assert threshold_at_max_f1(back) == threshold_at_max_f1(whole)


def test_merge_rejects_different_bins() -> None:
    with pytest.raises(ConfigError, match="different bins"):
        ScoreHistogram(n_bins=10).merge(ScoreHistogram(n_bins=11))
    with pytest.raises(ConfigError, match="lacks"):
        ScoreHistogram.from_state_dict({"range": torch.tensor([0.0, 1.0])})


def test_bad_histogram_arguments() -> None:
    with pytest.raises(ConfigError, match="low < high"):
        ScoreHistogram(1.0, 1.0)
    with pytest.raises(ConfigError, match="n_bins"):
        ScoreHistogram(n_bins=0)


def test_update_shapes_valid_mask_and_nan() -> None:
    scores, mask = make_scores(2)
    hist = ScoreHistogram()
    hist.update(scores.unsqueeze(-1), mask)  # (B, H, W, 1) scores port
    assert hist.n_normal + hist.n_anomalous == scores.numel()
    with pytest.raises(DataValidationError, match="does not match"):
        hist.update(scores[:, :10], mask)
    valid = torch.zeros_like(mask)
    valid[0] = True
    part = ScoreHistogram()
    part.update(scores, mask, valid=valid)
    assert part.n_normal + part.n_anomalous == scores[0].numel()
    before = hist.counts_normal.clone()
    bad = scores.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(DataValidationError, match="1 NaN"):
        hist.update(bad, mask)
    assert torch.equal(hist.counts_normal, before)  # nothing half-counted


# ---------------------------------------------------------------- threshold at FPR


@pytest.mark.parametrize("target", [1e-3, 1e-2, 0.05, 0.2])
@pytest.mark.parametrize("seed", [3, 4])
def test_threshold_at_fpr_against_brute_force(target: float, seed: int) -> None:
    scores, mask = make_scores(seed)
    hist = filled(scores, mask, low=-30.0, high=30.0, n_bins=4096)
    s, m = scores.double().numpy(), mask.numpy()
    t = threshold_at_fpr(hist, target)
    achieved = brute_fpr(s, m, t)
    assert achieved <= target
    # the lowest threshold meeting the target sits just above the critical normal score
    crit = critical_normal_score(s, m, target)
    assert crit < t <= crit + hist.bin_width
    result = calibrate_threshold(hist, "fpr", target)
    assert result.threshold == t
    assert result.fpr == achieved  # exact: thresholds are bin edges
    assert result.tpr == float(((s >= t) & m).sum() / m.sum())


def test_threshold_at_fpr_without_anomalies() -> None:
    scores, _ = make_scores(5)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    hist = filled(scores, mask)
    t = threshold_at_fpr(hist, 0.01)
    assert brute_fpr(scores.double().numpy(), mask.numpy(), t) <= 0.01
    result = calibrate_threshold(hist)  # auto -> fpr at the default target 1e-3
    assert result.method == "fpr" and result.target_fpr == 1e-3
    assert result.threshold == threshold_at_fpr(hist, 1e-3)
    assert result.tpr is None and result.f1 is None and result.precision is None
    assert result.n_anomalous == 0


def test_threshold_at_fpr_edge_cases() -> None:
    scores, mask = make_scores(6)
    hist = filled(scores, mask, low=-10.0, high=10.0, n_bins=100)
    assert threshold_at_fpr(hist, 1.0) == -10.0  # everything in range may be flagged
    t0 = threshold_at_fpr(hist, 0.0)
    assert brute_fpr(scores.double().numpy(), mask.numpy(), t0) == 0.0
    # all normal scores beyond the range: only +inf meets a small target
    high = filled(torch.full((10,), 50.0), torch.zeros(10, dtype=torch.bool), low=0.0, high=1.0)
    assert threshold_at_fpr(high, 0.1) == math.inf
    with pytest.raises(ConfigError, match="target_fpr"):
        threshold_at_fpr(hist, 1.5)
    only_anomalies = filled(torch.ones(5), torch.ones(5, dtype=torch.bool))
    with pytest.raises(DataValidationError, match="holds none"):
        threshold_at_fpr(only_anomalies, 0.01)


# ---------------------------------------------------------------- threshold at max F1


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_threshold_at_max_f1_against_brute_force(seed: int) -> None:
    scores, mask = make_scores(seed, shift=2.0)
    hist = filled(scores, mask, n_bins=4096)
    s, m = scores.double().numpy(), mask.numpy()
    t = threshold_at_max_f1(hist)
    ours = brute_f1(s, m, t)
    best = brute_max_f1(s, m)
    assert ours <= best + 1e-12
    assert ours >= best - 0.01  # binning costs at most a little F1
    result = calibrate_threshold(hist)  # auto -> max_f1 (anomalies present)
    assert result.method == "max_f1" and result.threshold == t
    assert result.f1 == pytest.approx(ours, abs=1e-12)
    assert result.fpr == brute_fpr(s, m, t)


def test_max_f1_matches_exactly_when_bins_separate_all_scores() -> None:
    # scores on a coarse grid that coincides with bin edges: binning loses nothing
    rng = np.random.default_rng(10)
    s = rng.integers(-20, 20, size=3000).astype(np.float64) / 4
    m = rng.random(3000) < (s > 2) * 0.6 + 0.02
    hist = filled(torch.from_numpy(s), torch.from_numpy(m), low=-5.0, high=5.0, n_bins=40)
    t = threshold_at_max_f1(hist)
    assert brute_f1(s, m, t) == pytest.approx(brute_max_f1(s, m), abs=1e-12)


def test_max_f1_picks_the_middle_of_an_empty_gap() -> None:
    scores = torch.tensor([0.05, 0.15, 0.95])
    mask = torch.tensor([False, False, True])
    hist = filled(scores, mask, low=0.0, high=1.0, n_bins=10)
    # any threshold in [0.2, 0.9] separates perfectly; the middle keeps the widest margin
    assert threshold_at_max_f1(hist) == pytest.approx(0.55)
    assert calibrate_threshold(hist).f1 == 1.0


def test_max_f1_without_anomalies_is_a_clear_error() -> None:
    scores, _ = make_scores(11)
    hist = filled(scores, torch.zeros_like(scores, dtype=torch.bool))
    with pytest.raises(DataValidationError, match=r"needs anomalous pixels.*method='fpr'"):
        threshold_at_max_f1(hist)
    with pytest.raises(DataValidationError):
        calibrate_threshold(hist, "max_f1")


def test_calibrate_bad_method() -> None:
    with pytest.raises(ConfigError, match="method"):
        calibrate_threshold(ScoreHistogram(), "youden")  # type: ignore[arg-type]


# ---------------------------------------------------------------- probability form


def test_logit_probability_conversions() -> None:
    # beyond ~15 the float64 probability 1 - p keeps too few digits for an exact inverse
    for logit in (-30.0, -2.5, 0.0, 1.25, 15.0):
        p = logit_to_probability(logit)
        assert p == pytest.approx(float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64))))
        assert probability_to_logit(p) == pytest.approx(logit, abs=1e-6)
    assert logit_to_probability(-1000.0) == 0.0 and logit_to_probability(1000.0) == 1.0
    assert logit_to_probability(math.inf) == 1.0 and logit_to_probability(-math.inf) == 0.0
    assert probability_to_logit(0.0) == -math.inf and probability_to_logit(1.0) == math.inf
    with pytest.raises(ConfigError):
        probability_to_logit(1.5)


def test_calibration_probability_and_dict() -> None:
    scores, mask = make_scores(12)
    result = calibrate_threshold(filled(scores, mask), "fpr", 0.01)
    assert isinstance(result, ThresholdCalibration)
    assert result.probability == logit_to_probability(result.threshold)
    # decisions made in probability space equal those made in logit space
    probs = torch.sigmoid(scores.double())
    assert torch.equal(probs >= result.probability, scores.double() >= result.threshold)
    d = result.as_dict()
    assert d["method"] == "fpr" and d["target_fpr"] == 0.01 and "probability" in d
    with pytest.raises(AttributeError):
        result.threshold = 0.0  # type: ignore[misc]


# ---------------------------------------------------------------- real scene


def _abu_dir() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    for cand in (root / "data" / "session", root.parent / "shared" / "data" / "abu"):
        if (cand / "abu-airport-1.mat").exists():
            return cand
    return None


@pytest.mark.skipif(_abu_dir() is None, reason="bundled ABU scenes not found")
def test_fpr_threshold_on_real_rx_scores() -> None:
    """Global RX on Los Angeles-1: the heavy-tailed scores still calibrate exactly."""
    from scipy.io import loadmat

    mat = loadmat(str(_abu_dir() / "abu-airport-1.mat"))  # type: ignore[operator]
    x = mat["data"].astype(np.float64).reshape(-1, mat["data"].shape[-1])
    m = mat["map"].reshape(-1) != 0
    d = x - x.mean(0)
    cov = np.cov(x, rowvar=False)
    rx = np.einsum("ij,ij->i", d @ np.linalg.inv(cov), d)
    # log1p keeps the long tail inside a modest range, as a score-to-logit head would
    s = np.log1p(rx)
    hist = filled(torch.from_numpy(s), torch.from_numpy(m), low=0.0, high=12.0, n_bins=4096)
    assert hist.n_out_of_range == 0
    for target in (1e-3, 1e-2):
        t = threshold_at_fpr(hist, target)
        assert brute_fpr(s, m, t) <= target
        crit = critical_normal_score(s, m, target)
        assert crit < t <= crit + hist.bin_width
    result = calibrate_threshold(hist)
    assert result.method == "max_f1"
    assert result.f1 == pytest.approx(brute_f1(s, m, result.threshold), abs=1e-12)
    assert result.f1 is not None and result.f1 >= brute_max_f1(s, m) - 0.01
