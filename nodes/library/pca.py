"""PCA projection initialized from the training covariance (Pearson 1901; eigh in float64)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from nodes.graph.base import Node, unfitted
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node
from nodes.training.stats import MomentState


@register_node
class TrainablePCA(Node):
    """Project onto the top ``n_components`` principal axes; the axes are trainable in Phase 2.

    Buffers: ``mean`` (C,), ``components`` (k, C) (rows sorted by decreasing variance, sign fixed
    so the largest-magnitude loading is positive), ``explained_variance`` (k,).

    Args:
        n_components: Number of components k.
        input_dim: Number of input channels C.
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "data": PortSpec("float", ("B", "H", "W", "input_dim"), "input cube"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "projected": PortSpec("float", ("B", "H", "W", "n_components"), "principal scores"),
    }
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ("components",)
    FITTED_BUFFERS: ClassVar[tuple[str, ...] | None] = ("mean", "components")
    DEFAULT_NAME: ClassVar[str | None] = "pca"
    MAIN_INPUT: ClassVar[str | None] = "data"
    MAIN_OUTPUT: ClassVar[str | None] = "projected"
    mean: Tensor
    components: Tensor
    explained_variance: Tensor

    def __init__(self, n_components: int, input_dim: int, name: str | None = None,
                 execution_stages: Iterable[str] | None = None) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        if not 0 < n_components <= input_dim:
            raise ValueError(f"n_components must be in 1..{input_dim}, got {n_components}")
        self.n_components = int(n_components)
        self.input_dim = int(input_dim)
        self._remember(n_components=self.n_components, input_dim=self.input_dim)
        k, c = self.n_components, self.input_dim
        self.declare_fitted(
            mean=unfitted(c), components=unfitted(k, c), explained_variance=unfitted(k)
        )

    @property
    def is_affine(self) -> bool:  # noqa: D102
        return True

    def fit_from_moments(self, moments: MomentState) -> None:
        """Eigen-decompose the float64 covariance."""
        evals, evecs = torch.linalg.eigh(moments.cov(ddof=1))
        order = torch.argsort(evals, descending=True)[: self.n_components]
        comps = evecs[:, order].T
        signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
        comps = comps * signs
        dev = self.mean.device
        self.mean = moments.mean.to(dev, torch.float32).clone()
        self.components = comps.to(dev, torch.float32).contiguous()
        self.explained_variance = evals[order].clamp_min(0).to(dev, torch.float32)
        self._mark_fitted()

    def affine_map(self) -> tuple[Tensor, Tensor | None, bool] | None:  # noqa: D102
        if not self.is_initialized:
            return None
        a = self.components.detach().double()
        return a, -(a @ self.mean.double()), False

    def forward(self, data: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Project ``data`` (B, H, W, C) → (B, H, W, k)."""
        self.check_initialized()
        return {"projected": (data - self.mean.to(data.dtype)) @ self.components.T.to(data.dtype)}
