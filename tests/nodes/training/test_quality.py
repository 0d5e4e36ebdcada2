"""Initialization quality (nodes/training/quality.py) and outlier trimming in Phase 1."""

from __future__ import annotations

import pytest
import torch

from nodes import CubeDataModule, Pipeline, RXGlobal, StatisticalTrainer
from nodes.errors import CubelineError
from nodes.training.quality import InitializationQualityError, assess


def _cubes(n: int, seed: int, shift: float = 0.0, outliers: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[1.0, 0.5, 0.0, 0.2], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 1.0, 0.4],
                        [0.0, 0.0, 0.0, 1.0]])
    cubes = torch.randn(n, 20, 20, 4, generator=gen) @ mix + 10.0 + shift
    if outliers:  # far-off pixels hidden in the (unlabelled) training frames
        flat = cubes.view(-1, 4)
        idx = torch.randperm(flat.shape[0], generator=gen)[:outliers]
        flat[idx] += 25.0 * torch.randn(outliers, 4, generator=gen)
    return cubes


def _dm(train: torch.Tensor, held_out: torch.Tensor) -> CubeDataModule:
    cubes = torch.cat([train, held_out])
    masks = torch.zeros(cubes.shape[:3], dtype=torch.bool)
    n = train.shape[0]
    return CubeDataModule.from_arrays(cubes, masks, train_ids=list(range(n)), val_ids=[n],
                                      test_ids=[n], batch_size=2)


def _fit(dm: CubeDataModule, eps: float = 0.0, **kw: object
         ) -> tuple[Pipeline, RXGlobal, StatisticalTrainer]:
    pipeline = Pipeline()
    rx = RXGlobal(num_channels=4, eps=eps)
    pipeline.add_node(rx)
    trainer = StatisticalTrainer(pipeline, dm, **kw)  # type: ignore[arg-type]
    trainer.fit()
    return pipeline, rx, trainer


def test_fit_ratio_is_the_mean_score_over_c_on_the_fit_pixels() -> None:
    train = _cubes(3, seed=0)
    dm = _dm(train, _cubes(1, seed=1))
    for eps in (0.0, 0.5):
        _, rx, trainer = _fit(dm, eps=eps)
        q = trainer.report.quality["rx_detector"]
        mean_score = float(rx(data=train.double())["scores"].mean())
        assert q.fit_ratio == pytest.approx(mean_score / 4, rel=1e-9)
    # Without a ridge it is exactly (n - 1) / n: the mean score is about C, not <= 1 (the
    # reference guide's threshold), so the guide's check would flag every correct fit.
    _, rx, trainer = _fit(dm, eps=0.0)
    n = 3 * 20 * 20
    assert trainer.report.quality["rx_detector"].fit_ratio == pytest.approx((n - 1) / n)
    assert trainer.report.quality["rx_detector"].ok


def test_a_ridge_that_drowns_the_variance_is_flagged() -> None:
    dm = _dm(_cubes(3, seed=0), _cubes(1, seed=1))
    _, _, trainer = _fit(dm, eps=50.0)
    q = trainer.report.quality["rx_detector"]
    assert q.fit_ratio < 0.1 and not q.ok
    assert "eps=50.0" in q.reasons[0] and "lower RXGlobal eps" in q.reasons[0]


def test_held_out_check_passes_on_like_data_and_flags_drifted_data() -> None:
    _, _, trainer = _fit(_dm(_cubes(3, seed=0), _cubes(1, seed=1)))
    (q,) = trainer.check_initialization("val").values()
    assert q.ok and q.held_out_ratio == pytest.approx(1.0, abs=0.15)
    _, _, drifted = _fit(_dm(_cubes(3, seed=0), _cubes(1, seed=1, shift=4.0)))
    (bad,) = drifted.check_initialization("val").values()
    assert not bad.ok and bad.held_out_ratio is not None and bad.held_out_ratio > 3
    assert drifted.report.quality["rx_detector"].held_out_split == "val"
    with pytest.raises(InitializationQualityError, match=r"rx_detector: val ratio"):
        drifted.check_initialization("val", strict=True)
    metrics = bad.to_metrics()
    assert metrics["init_quality/rx_detector/ok"] == 0.0
    assert "init_quality/rx_detector/val_ratio" in metrics


def test_assess_reports_nan_as_bad() -> None:
    assert not assess("rx", 3, float("nan")).ok


def test_trimming_outliers_recovers_the_clean_background() -> None:
    clean, dirty = _cubes(3, seed=0), _cubes(3, seed=0, outliers=12)
    held = _cubes(1, seed=1)
    _, rx_clean, _ = _fit(_dm(clean, held))
    _, rx_dirty, _ = _fit(_dm(dirty, held))
    _, rx_trim, trainer = _fit(_dm(dirty, held), trim_quantile=0.98)
    report = trainer.report
    assert report.passes == 3  # the fit's pass + histogram + refit
    t = report.trimmed["rx_detector"]
    assert t["kept"] + t["dropped"] == 1200 and 12 <= t["dropped"] <= 30
    err_dirty = float((rx_dirty.sigma - rx_clean.sigma).norm())
    err_trim = float((rx_trim.sigma - rx_clean.sigma).norm())
    assert err_trim < 0.2 * err_dirty  # the outliers' spread is gone from the covariance


def test_trim_quantile_is_checked() -> None:
    dm = _dm(_cubes(1, seed=0), _cubes(1, seed=1))
    with pytest.raises(CubelineError, match=r"trim_quantile must be in \[0.5, 1\)"):
        StatisticalTrainer(Pipeline(), dm, trim_quantile=1.0)
