"""Drift check on real ABU frames and on small generated moments."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from nodes.errors import DataValidationError
from nodes.training.drift import DriftThresholds, compare_moments, plot_drift_report
from nodes.training.stats import MomentState

Pixels = Callable[[str], np.ndarray]


@pytest.fixture(scope="module")
def scene(scene_path: Callable[[str], Path]) -> Pixels:
    """``scene("airport-1")`` → the scene's pixels (H*W, C) in float64."""

    def load(name: str) -> np.ndarray:
        cube = scipy.io.loadmat(scene_path(name))["data"].astype(np.float64)
        return cube.reshape(-1, cube.shape[-1])

    return load


def _moments(pixels: np.ndarray) -> MomentState:
    return MomentState.from_samples(torch.from_numpy(pixels))


@pytest.fixture(scope="module")
def train_pixels(scene: Pixels) -> np.ndarray:
    return np.concatenate([scene(f"airport-{i}") for i in (1, 2, 3)])


@pytest.fixture(scope="module")
def reference(train_pixels: np.ndarray) -> MomentState:
    return _moments(train_pixels)


def simulated_illumination_change(pixels: np.ndarray, seed: int = 0) -> np.ndarray:
    """SIMULATED illumination change: a smooth per-band gain (0.75-0.9) plus path-radiance offset.

    Not a real acquisition: the same pixels, dimmed as under a lower sun, with an additive offset
    that is larger in the short-wavelength bands (scattering).
    """
    rng = np.random.default_rng(seed)
    c = pixels.shape[1]
    t = np.linspace(0.0, 1.0, c)
    gain = 0.75 + 0.15 * t + 0.02 * rng.standard_normal(c)
    offset = 0.03 * pixels.mean(axis=0) * (1.0 - t)
    return pixels * gain + offset


def test_identical_frames_do_not_drift(reference: MomentState, train_pixels: np.ndarray) -> None:
    report = compare_moments(reference, _moments(train_pixels.copy()))
    assert not report.drifted
    assert report.fired == ()
    assert report.drifted_bands == ()
    assert all(c.value == pytest.approx(0.0, abs=1e-6) for c in report.criteria)
    assert report.reason.startswith("no drift")


def test_simulated_illumination_change_drifts(
    reference: MomentState, train_pixels: np.ndarray
) -> None:
    report = compare_moments(reference, _moments(simulated_illumination_change(train_pixels)))
    assert report.drifted
    assert "mean_shift" in report.fired
    shift = next(c for c in report.criteria if c.name == "mean_shift")
    assert shift.value > 3 * shift.threshold
    assert report.reason.startswith("drift:")


def test_each_training_frame_alone_is_within_thresholds(
    reference: MomentState, scene: Pixels
) -> None:
    # The thresholds must not flag data the model was initialized on.
    for i in (1, 2, 3):
        report = compare_moments(reference, _moments(scene(f"airport-{i}")))
        assert not report.drifted, f"airport-{i}: {report.reason}"


def test_other_scenes_of_the_session(reference: MomentState, scene: Pixels) -> None:
    """urban-4/5 (same sensor, other land cover): what the check says, pinned.

    Pooled, their means stay within the reference's Mahalanobis metric, but their covariance
    (and most bands' variance) differs from the airport scenes: drift by covariance. urban-5
    alone is close to the airports on every criterion.
    """
    pooled = compare_moments(
        reference, _moments(np.concatenate([scene("urban-4"), scene("urban-5")]))
    )
    assert pooled.drifted
    assert set(pooled.fired) == {"cov_divergence", "band_fraction"}
    assert len(pooled.drifted_bands) > 0.5 * 205
    urban4 = compare_moments(reference, _moments(scene("urban-4")))
    assert urban4.drifted
    assert set(urban4.fired) == {"mean_shift", "cov_divergence", "band_fraction"}
    urban5 = compare_moments(reference, _moments(scene("urban-5")))
    assert not urban5.drifted, urban5.reason


def test_other_band_count_is_bad_input_not_drift(reference: MomentState) -> None:
    other = _moments(np.random.default_rng(0).normal(size=(500, 204)))
    with pytest.raises(DataValidationError, match=r"204 bands .* have 205"):
        compare_moments(reference, other)


def _gaussian(n: int, c: int, seed: int, shift: np.ndarray | None = None) -> MomentState:
    rng = np.random.default_rng(seed)
    mix = np.eye(c) + 0.3 * np.random.default_rng(99).normal(size=(c, c))
    x = rng.normal(size=(n, c)) @ mix + 10.0
    if shift is not None:
        x = x + shift
    return _moments(x)


def test_single_band_shift_is_named() -> None:
    c = 8
    ref = _gaussian(4000, c, seed=1)
    shift = np.zeros(c)
    shift[5] = 4.0 * math.sqrt(float(ref.var()[5]))
    report = compare_moments(ref, _gaussian(4000, c, seed=2, shift=shift))
    assert report.drifted
    assert report.drifted_bands == (5,)
    assert {"mean_shift", "band_fraction"} <= set(report.fired)
    assert "5" in report.reason


def test_same_distribution_other_sample_does_not_drift() -> None:
    report = compare_moments(_gaussian(4000, 8, seed=1), _gaussian(4000, 8, seed=2))
    assert not report.drifted, report.reason


def test_min_criteria_requires_agreement() -> None:
    c = 8
    ref = _gaussian(4000, c, seed=1)
    shift = np.zeros(c)
    shift[5] = 4.0 * math.sqrt(float(ref.var()[5]))
    new = _gaussian(4000, c, seed=2, shift=shift)
    strict = compare_moments(ref, new, DriftThresholds(min_criteria=3))
    assert not strict.drifted
    assert "2 of 3 criteria fired" in strict.reason


def test_too_few_pixels_and_non_finite_are_bad_input() -> None:
    ref = _gaussian(100, 4, seed=1)
    one = _moments(np.ones((1, 4)))
    with pytest.raises(DataValidationError, match="at least 2"):
        compare_moments(ref, one)
    bad = np.random.default_rng(0).normal(size=(10, 4))
    bad[3, 2] = np.nan
    with pytest.raises(DataValidationError, match="NaN or inf"):
        compare_moments(ref, _moments(bad))


@pytest.mark.parametrize(
    "kwargs",
    [{"ridge": 0.0}, {"mean_shift": -1.0}, {"band_fraction": 1.5}, {"min_criteria": 4}],
)
def test_invalid_thresholds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="drift"):
        DriftThresholds(**kwargs)  # type: ignore[arg-type]


def test_report_dict_and_plot(tmp_path: Path) -> None:
    ref = _gaussian(2000, 6, seed=1)
    shift = np.zeros(6)
    shift[2] = 5.0
    report = compare_moments(ref, _gaussian(2000, 6, seed=2, shift=shift))
    d = report.to_dict()
    assert d["drifted"] is True and d["fired"] == list(report.fired)
    assert len(d["band_smd"]) == 6
    assert set(report.summary()) >= {"drifted", "reason", "mean_shift", "drifted_bands"}
    png = plot_drift_report(report, tmp_path / "sub" / "drift.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
