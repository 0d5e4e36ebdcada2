"""Min-max normalization (nodes/library/normalization.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from nodes import (
    AnomalyDataNode,
    MinMaxNormalizer,
    NotInitializedError,
    Pipeline,
    RXGlobal,
    SoftChannelSelector,
    StatisticalTrainer,
)
from nodes.training.stats import MomentState


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def _cube(seed: int = 0, c: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 6, 7, c, generator=g) * torch.arange(1, c + 1) * 100 + 50).float()


def test_global_min_max_from_moments() -> None:
    x = _cube()
    norm = MinMaxNormalizer(eps=1e-6)
    assert norm.requires_initial_fit and not norm.is_initialized
    with pytest.raises(NotInitializedError, match=r"StatisticalTrainer\.fit\(\) first"):
        norm(data=x)
    norm.fit_from_moments(MomentState.from_samples(x.reshape(-1, 5)))
    assert norm.running_min.shape == () and norm.running_max.shape == ()
    assert float(norm.running_min) == float(x.min())
    assert float(norm.running_max) == float(x.max())
    y = norm(data=x)["normalized"]
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert float(y.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(y.max()) == pytest.approx(1.0, abs=1e-6)
    expect = (x - x.min()) / (x.max() - x.min() + 1e-6)
    torch.testing.assert_close(y, expect)


def test_per_channel_min_max() -> None:
    x = _cube(1)
    norm = MinMaxNormalizer(per_channel=True)
    assert norm.running_min.numel() == 0  # shaped at fit time
    norm.fit_from_moments(MomentState.from_samples(x.reshape(-1, 5)))
    assert torch.equal(norm.running_min, x.reshape(-1, 5).amin(0))
    assert torch.equal(norm.running_max, x.reshape(-1, 5).amax(0))
    y = norm(data=x)["normalized"].reshape(-1, 5)
    torch.testing.assert_close(y.amin(0), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.amax(0), torch.ones(5), atol=1e-5, rtol=0)


def test_fit_needs_exact_min_max() -> None:
    st = MomentState.from_samples(torch.rand(10, 3, dtype=torch.float64))
    mixed = st.affine(torch.rand(2, 3, dtype=torch.float64))  # min/max lost by mixing
    with pytest.raises(ValueError, match="min/max"):
        MinMaxNormalizer(name="n").fit_from_moments(mixed)


@pytest.mark.parametrize("per_channel", [False, True])
def test_affine_map_matches_forward(per_channel: bool) -> None:
    x = _cube(2)
    norm = MinMaxNormalizer(per_channel=per_channel)
    assert norm.affine_map() is None  # not before the fit
    st = MomentState.from_samples(x.reshape(-1, 5))
    norm.fit_from_moments(st)
    assert norm.is_affine and norm.affine_keeps_minmax
    amap = norm.affine_map()
    assert amap is not None
    a, b, keeps = amap
    assert keeps
    y = norm(data=x)["normalized"].reshape(-1, 5)
    pushed = st.affine(a, b, keeps_minmax=keeps)
    direct = MomentState.from_samples(y)
    assert _rel(pushed.mean, direct.mean) <= 1e-6
    assert _rel(pushed.m2, direct.m2) <= 1e-5
    torch.testing.assert_close(pushed.min, direct.min, atol=1e-6, rtol=0)
    torch.testing.assert_close(pushed.max, direct.max, atol=1e-6, rtol=0)


def test_per_sample_scaling_needs_no_fit() -> None:
    x = _cube(3)
    norm = MinMaxNormalizer(use_running_stats=False)
    assert not norm.requires_initial_fit and norm.is_initialized
    assert not norm.is_affine and norm.affine_map() is None
    y = norm(data=x)["normalized"]
    for i in range(2):  # each sample scaled by its own range
        assert float(y[i].min()) == pytest.approx(0.0, abs=1e-6)
        assert float(y[i].max()) == pytest.approx(1.0, abs=1e-5)


def test_normalizer_behind_a_channel_mix_fits_in_the_same_pass(
    make_dm: Callable[..., Any], cubes: Any
) -> None:
    """Mixing loses min/max, so the normalizer's root is the mix output; still one pass."""
    pipe = Pipeline("p")
    data = AnomalyDataNode()
    sel = SoftChannelSelector(4, cubes.channels, init_method="uniform", name="sel")
    norm = MinMaxNormalizer(per_channel=True, name="norm")
    rx = RXGlobal(num_channels=4, eps=0.0, name="rx")
    pipe.connect((data.cube, sel.data), (sel.selected, norm.data), (norm.normalized, rx.data))
    dm = make_dm(train_ids=[0, 1, 2])
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert report.passes == 1 and dm.train_passes == 1
    assert report.plan["norm"] == ("sel.selected", [])
    assert report.plan["rx"] == ("data.cube", ["sel", "norm"])
    mixed = torch.from_numpy(cubes.pixels([0, 1, 2], dtype=np.float32)) @ sel.selection_matrix().T
    torch.testing.assert_close(norm.running_min, mixed.amin(0), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(norm.running_max, mixed.amax(0), rtol=1e-6, atol=1e-4)
