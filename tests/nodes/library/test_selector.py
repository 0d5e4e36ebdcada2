"""Soft channel selection (nodes/library/selector.py)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch

from nodes import NotInitializedError, RXGlobal, SoftChannelSelector
from nodes.training.stats import MomentState


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


# ---------------------------------------------------------------- soft mode (all bands out)


def test_soft_mode_reweights_every_band() -> None:
    x = _data()
    sel = SoftChannelSelector(n_select=3, input_channels=8, mode="soft")
    assert sel.out_channels == 8 and sel.requires_initial_fit
    sel.fit_from_moments(MomentState.from_samples(x.reshape(-1, 8)))
    w = sel.selection_matrix()
    assert w.shape == (8,)
    torch.testing.assert_close(w.sum(), torch.tensor(3.0))
    # log-variance logits at temperature T: weights grow as var ** (1 / T).
    var = x.reshape(-1, 8).double().var(dim=0)
    ratio = (w.double() / var.pow(1 / 5.0))
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-4, atol=0)
    out = sel(data=x)
    assert out["selected"].shape == x.shape and out["weights"].shape == (1, 8)
    torch.testing.assert_close(out["selected"], x * w)
    assert sel.selected_channels.tolist() == [1, 3, 5]  # the heaviest bands, in band order
    eps = 1e-6
    torch.testing.assert_close(sel.effective_ridge(eps), eps / w.double().square())


def test_soft_mode_uniform_and_bad_mode() -> None:
    sel = SoftChannelSelector(n_select=2, input_channels=4, init_method="uniform", mode="soft")
    assert sel.is_initialized
    torch.testing.assert_close(sel.selection_matrix(), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="mode must be"):
        SoftChannelSelector(n_select=2, input_channels=4, mode="medium")  # type: ignore[arg-type]


def test_soft_mode_affine_map_carries_moments_and_minmax() -> None:
    x = _data()
    sel = SoftChannelSelector(n_select=3, input_channels=8, mode="soft")
    st = MomentState.from_samples(x.reshape(-1, 8))
    sel.fit_from_moments(st)
    amap = sel.affine_map()
    assert amap is not None
    a, b, keeps = amap
    assert a.shape == (8,) and b is None and keeps and sel.affine_keeps_minmax
    pushed = st.affine(a, b, keeps_minmax=keeps)
    direct = MomentState.from_samples(sel(data=x)["selected"].reshape(-1, 8))
    assert _rel(pushed.mean, direct.mean) <= 1e-6
    assert _rel(pushed.m2, direct.m2) <= 1e-5


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_phase1_is_one_pass_in_both_modes(mode: str, tmp_path: Path) -> None:
    import numpy as np

    from nodes import CubeDataModule, Pipeline, StatisticalTrainer
    from nodes.library.presets import build_channel_selector_pipeline

    rng = np.random.default_rng(0)
    c = 8
    mix = rng.normal(size=(3, c))
    cubes = (rng.normal(size=(4, 12, 12, 3)) @ mix + 0.2 * rng.normal(size=(4, 12, 12, c))
             + 5.0).astype(np.float32)
    masks = np.zeros((4, 12, 12), dtype=bool)
    masks[:, 2:4, 2:4] = True
    dm = CubeDataModule.from_arrays(cubes, masks, train_ids=[0, 1], val_ids=[2], test_ids=[3],
                                    batch_size=1)
    pipe = build_channel_selector_pipeline(input_channels=c, n_select=3, selector_mode=mode)
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm, normal_only=True).fit()
    # normalizer -> selector -> RX in one pass; only the logit head behind RX (not affine)
    # costs the second one, in either mode.
    assert report.passes == 2
    # RX's statistics equal those of the selector's output computed directly.
    sel = cast(SoftChannelSelector, pipe.nodes["selector"])
    rx = cast(RXGlobal, pipe.nodes["rx"])
    assert rx.num_channels == (c if mode == "soft" else 3)
    dm.setup("fit")
    batches = [pipe.forward(b, stage="inference", outputs=["selector.selected"])
               for b in dm.train_dataloader()]
    sel_out = torch.cat([o["selector.selected"].reshape(-1, sel.out_channels) for o in batches])
    keep = ~torch.from_numpy(masks[:2]).reshape(-1)
    direct = MomentState.from_samples(sel_out[keep].double())
    assert _rel(rx.mu, direct.mean) <= 1e-6
    cov = direct.cov(ddof=1) + rx.eps * torch.eye(rx.num_channels, dtype=torch.float64)
    assert _rel(rx.sigma, cov) <= 1e-5
    # The mode survives a save/load round trip.
    path = pipe.save_to_file(tmp_path / "p.yaml")[0]
    loaded = Pipeline.load_from_file(path)
    loaded_sel = cast(SoftChannelSelector, loaded.nodes["selector"])
    assert loaded_sel.mode == mode
    torch.testing.assert_close(loaded_sel.channel_logits, sel.channel_logits)
