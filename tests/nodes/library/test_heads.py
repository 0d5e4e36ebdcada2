"""Score-to-logit head, binary decider (nodes/library/heads.py) and the BCE loss
(nodes/library/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nodes import AnomalyBCEWithLogits, BinaryDecider, NotInitializedError, ScoreToLogit
from nodes.training.stats import MomentState


def _scores(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 8, 8, generator=g).pow(3) * 200.0


def test_standardizing_head_gives_z_score_logits() -> None:
    s = _scores()
    head = ScoreToLogit(init_scale=2.0, init_bias=-1.0)
    assert head.requires_initial_fit and not head.is_initialized
    with pytest.raises(NotInitializedError, match="StatisticalTrainer"):
        head(scores=s)
    head.fit_from_moments(MomentState.from_samples(s.reshape(-1, 1)))
    logits = head(scores=s)["logits"].double()
    assert logits.shape == s.shape
    assert float(logits.mean()) == pytest.approx(-1.0, abs=1e-5)
    assert float(logits.std()) == pytest.approx(2.0, rel=1e-5)


def test_fixed_head_needs_no_fit() -> None:
    s = _scores(1)
    head = ScoreToLogit(init_scale=0.5, init_bias=3.0, standardize=False)
    assert not head.requires_initial_fit and head.is_initialized
    torch.testing.assert_close(head(scores=s)["logits"], 0.5 * s + 3.0)


def test_head_affine_map_matches_forward() -> None:
    s = _scores(2)
    st = MomentState.from_samples(s.reshape(-1, 1))
    head = ScoreToLogit(init_scale=1.5, init_bias=0.25)
    head.fit_from_moments(st)
    amap = head.affine_map()
    assert amap is not None
    a, b, keeps = amap
    assert keeps  # a positive scale keeps min/max
    pushed = st.affine(a, b, keeps_minmax=keeps)
    direct = MomentState.from_samples(head(scores=s)["logits"].reshape(-1, 1))
    torch.testing.assert_close(pushed.mean, direct.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(pushed.m2, direct.m2, rtol=1e-5, atol=0)
    torch.testing.assert_close(pushed.max, direct.max, rtol=1e-5, atol=1e-5)


def test_decider_thresholds_probabilities() -> None:
    logits = torch.tensor([[[-3.0, -0.1, 0.0, 0.1, 2.0]]])
    out = BinaryDecider(threshold=0.5)(logits=logits)["decisions"]
    assert out.dtype == torch.bool
    assert out.tolist() == [[[False, False, True, True, True]]]
    d = BinaryDecider(threshold=0.9)
    assert d.logit_threshold == pytest.approx(math.log(9.0))
    expect = torch.sigmoid(logits) >= 0.9
    assert torch.equal(d(logits=logits)["decisions"], expect)
    d.set_threshold(0.05)
    assert torch.equal(d(logits=logits)["decisions"], torch.sigmoid(logits) >= 0.05)
    assert "threshold" in d.state_dict()  # a calibrated threshold is saved with the model


def test_decider_compares_in_logit_space_beyond_float32_saturation() -> None:
    # sigmoid(30) and sigmoid(31) are both 1.0 in float32; the decider must still separate them.
    d = BinaryDecider()
    d.set_logit_threshold(30.5)
    logits = torch.tensor([[[30.0, 31.0]]])
    assert d(logits=logits)["decisions"].tolist() == [[[False, True]]]
    assert d.logit_threshold == pytest.approx(30.5, abs=1e-2)


def test_decider_rejects_non_probabilities() -> None:
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            BinaryDecider(threshold=bad)
    with pytest.raises(ValueError):
        BinaryDecider().set_threshold(1.0)


def test_bce_loss_is_weighted_mean_bce() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 5, generator=g)
    targets = torch.rand(2, 5, 5, generator=g) < 0.2
    loss = AnomalyBCEWithLogits(name="bce", weight=10.0)
    assert loss.name == "bce"
    assert "inference" not in loss.execution_stages
    expect = 10.0 * F.binary_cross_entropy_with_logits(logits, targets.float())
    torch.testing.assert_close(loss(predictions=logits, targets=targets)["loss"], expect)
    weighted = AnomalyBCEWithLogits(weight=2.0, pos_weight=5.0)
    expect_pw = 2.0 * F.binary_cross_entropy_with_logits(logits, targets.float(),
                                                         pos_weight=torch.tensor(5.0))
    torch.testing.assert_close(weighted(predictions=logits, targets=targets)["loss"], expect_pw)


def test_threshold_beyond_float64_sigmoid_flags_nothing() -> None:
    """A calibrated logit of 40 (all-normal validation frames) rounds to probability 1."""
    d = BinaryDecider()
    d.set_logit_threshold(40.0)
    assert d.logit_threshold == math.inf
    assert not d(logits=torch.full((1, 2, 2), 39.0))["decisions"].any()
    d.set_logit_threshold(-800.0)
    assert d(logits=torch.full((1, 2, 2), -1e4))["decisions"].all()
