"""The node base class (nodes/graph/base.py): init flags, manual restore, freezed, the stream
fit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

import pytest
import torch

from nodes import (
    MinMaxNormalizer,
    Node,
    NotInitializedError,
    PortSpec,
    RXGlobal,
    TrainablePCA,
)
from nodes.training.stats import MomentState


def test_guide_flag_is_settable_and_checks_the_statistics() -> None:
    rx = RXGlobal(num_channels=2)
    assert not rx._statistically_initialized
    with pytest.raises(NotInitializedError, match=r"mu holds NaN.*\['mu', 'cov_factor'\]"):
        rx._statistically_initialized = True
    rx.mu = torch.zeros(2, dtype=torch.float64)
    rx.sigma = torch.eye(2, dtype=torch.float64)
    assert rx._statistically_initialized
    rx._statistically_initialized = False
    assert not rx.is_initialized


@pytest.mark.parametrize("order", [("running_min", "running_max"), ("running_max", "running_min")])
def test_assigning_every_statistic_marks_the_node(order: tuple[str, str]) -> None:
    norm = MinMaxNormalizer()
    values = {"running_min": torch.tensor(1.0), "running_max": torch.tensor(3.0)}
    setattr(norm, order[0], values[order[0]])
    assert not norm.is_initialized  # one of two is not a fit
    setattr(norm, order[1], values[order[1]])
    assert norm.is_initialized
    assert torch.allclose(norm(data=torch.full((1, 1, 1, 2), 2.0))["normalized"],
                          torch.tensor(0.5), atol=1e-5)


def test_pca_needs_mean_and_components() -> None:
    pca = TrainablePCA(n_components=1, input_dim=2)
    pca.components = torch.tensor([[1.0, 0.0]])
    assert not pca.is_initialized
    pca.mean = torch.zeros(2)
    assert pca.is_initialized
    pca.mark_initialized()  # public, and a no-op here


def test_freezed_is_the_inverse_of_training_state() -> None:
    rx = RXGlobal(num_channels=2)
    rx.mu = torch.zeros(2, dtype=torch.float64)
    rx.sigma = torch.eye(2, dtype=torch.float64)
    assert rx.freezed
    rx.freezed = False
    assert not rx.freezed and rx.mu.requires_grad
    rx.freezed = True
    assert rx.freezed and not rx.mu.requires_grad


def test_builtin_nodes_also_fit_from_a_stream() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [{"data": torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64)}
               for _ in range(3)]
    rx = RXGlobal(num_channels=4, eps=0.0)
    rx.statistical_initialization(batches)
    x = torch.cat([b["data"].reshape(-1, 4) for b in batches])
    torch.testing.assert_close(rx.mu, x.mean(0))
    torch.testing.assert_close(rx.sigma, torch.cov(x.T))
    assert not rx.fits_from_stream  # the trainer keeps using moments for it


class _Counter(Node):
    """A stream-only node with no fitted-flag buffer (the guide's pattern)."""

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {"data": PortSpec("float", ("B", "H", "W", "C"))}

    def statistical_initialization(self, input_stream: Iterable[Mapping[str, torch.Tensor]]
                                   ) -> None:
        self.seen = sum(int(b["data"].shape[0]) for b in input_stream)


def test_stream_only_nodes_require_a_fit_and_keep_their_flag_off_the_state_dict() -> None:
    node = _Counter()
    assert node.requires_initial_fit and node.fits_from_stream and not node.is_initialized
    node.statistical_initialization([{"data": torch.zeros(2, 1, 1, 1)}])
    node.mark_initialized()
    assert node.is_initialized and node.seen == 2 and "fitted" not in node.state_dict()


def test_a_node_without_any_fit_says_what_to_implement() -> None:
    with pytest.raises(NotImplementedError, match="implement statistical_initialization"):
        Node().statistical_initialization([])
    empty = MomentState.empty(2)
    with pytest.raises(ValueError, match="covariance needs more than 1 samples"):
        RXGlobal(num_channels=2).fit_from_moments(empty)
