"""Soft channel selection (nodes/selector.py)."""

from __future__ import annotations

import pytest
import torch

from nodes import NotInitializedError, SoftChannelSelector
from nodes.stats import MomentState


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def _data(c: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([1.0, 9.0, 2.0, 7.0, 3.0, 8.0, 0.5, 4.0])[:c]
    return torch.randn(2, 10, 10, c, generator=g) * spread + 10.0


def test_variance_init_picks_the_highest_variance_bands_in_band_order() -> None:
    x = _data()
    sel = SoftChannelSelector(n_select=3, input_channels=8, init_method="variance")
    assert sel.requires_initial_fit and not sel.is_initialized
    assert torch.isnan(sel.channel_logits).all()
    with pytest.raises(NotInitializedError, match="StatisticalTrainer"):
        sel(data=x)
    sel.fit_from_moments(MomentState.from_samples(x.reshape(-1, 8)))
    assert sel.is_initialized
    assert sel.selected_channels.tolist() == [1, 3, 5]  # spreads 9, 7, 8


def test_uniform_init_needs_no_fit() -> None:
    sel = SoftChannelSelector(n_select=4, input_channels=10, init_method="uniform")
    assert not sel.requires_initial_fit and sel.is_initialized
    assert sel.selected_channels.tolist() == [0, 3, 6, 9]


@pytest.mark.parametrize("temperature", [0.5, 5.0, 50.0])
def test_selection_matrix_is_a_soft_pick(temperature: float) -> None:
    sel = SoftChannelSelector(n_select=3, input_channels=12, init_method="uniform",
                              temperature_init=temperature)
    w = sel.selection_matrix()
    assert w.shape == (3, 12)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    # The picked band gets the same share whatever the temperature.
    torch.testing.assert_close(w.max(1).values, torch.full((3,), 0.98), atol=1e-5, rtol=0)


def test_forward_and_affine_map_agree() -> None:
    x = _data()
    sel = SoftChannelSelector(n_select=3, input_channels=8)
    st = MomentState.from_samples(x.reshape(-1, 8))
    sel.fit_from_moments(st)
    out = sel(data=x)
    w = sel.selection_matrix()
    assert out["selected"].shape == (2, 10, 10, 3)
    assert torch.equal(out["weights"], w)
    torch.testing.assert_close(out["selected"], x @ w.T)
    assert sel.is_affine and not sel.affine_keeps_minmax
    amap = sel.affine_map()
    assert amap is not None
    a, b, keeps = amap
    assert b is None and not keeps and a.dtype == torch.float64
    pushed = st.affine(a, b)
    direct = MomentState.from_samples(out["selected"].reshape(-1, 3))
    assert _rel(pushed.mean, direct.mean) <= 1e-6
    assert _rel(pushed.m2, direct.m2) <= 1e-5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"n_select must be in 1\.\.4"):
        SoftChannelSelector(n_select=5, input_channels=4)
    with pytest.raises(ValueError, match="n_select"):
        SoftChannelSelector(n_select=0, input_channels=4)
    with pytest.raises(ValueError, match="init_method"):
        SoftChannelSelector(n_select=2, input_channels=4, init_method="random")  # type: ignore[arg-type]


def test_unfreeze_makes_logits_trainable() -> None:
    sel = SoftChannelSelector(n_select=2, input_channels=6, init_method="uniform")
    sel.unfreeze()
    assert isinstance(sel.channel_logits, torch.nn.Parameter)
    x = torch.rand(1, 3, 3, 6)
    sel(data=x)["selected"].sum().backward()
    assert sel.channel_logits.grad is not None
    assert float(sel.channel_logits.grad.abs().sum()) > 0
    assert "temperature" in dict(sel.named_buffers())  # stays a buffer
