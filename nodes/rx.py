"""Global RX anomaly detector (Reed & Xiaoli 1990).

The score of a pixel is its squared Mahalanobis distance to the background,
``(x - mu)^T (Sigma + eps I)^{-1} (x - mu)``. We keep the Cholesky factor ``L`` of
``Sigma + eps I`` (float64) and score with a triangular solve, ``||L^{-1}(x - mu)||^2``, which is
stabler than an explicit inverse on the nearly singular covariances of adjacent bands. The factor
is also the Phase-2 parameterization of the precision: ``L L^T`` stays symmetric positive
definite whatever the optimizer does to the lower triangle (the diagonal enters by magnitude).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from nodes.base import Node
from nodes.errors import CubelineError
from nodes.ports import PortSpec
from nodes.registry import register_node
from nodes.stats import MomentState

_F64 = torch.float64


@register_node
class RXGlobal(Node):
    """Global Reed-Xiaoli detector with float64 statistics.

    Buffers: ``mu`` (C,) the background mean; ``cov_factor`` (C, C) the lower Cholesky factor of
    ``Sigma + eps I``. ``sigma`` (C, C) is derived from it (and can be assigned).

    Args:
        num_channels: Number of input channels C.
        eps: Ridge added to the covariance diagonal (0 reproduces textbook RX).
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "data": PortSpec("float", ("B", "H", "W", "num_channels"), "pixels to score"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "scores": PortSpec("float", ("B", "H", "W"), "squared Mahalanobis distance"),
    }
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ("mu", "cov_factor")
    MAIN_INPUT: ClassVar[str | None] = "data"
    mu: Tensor
    cov_factor: Tensor

    def __init__(self, num_channels: int, eps: float = 1e-6, name: str | None = None,
                 **kwargs: object) -> None:
        super().__init__(name=name, **kwargs)  # type: ignore[arg-type]
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self._remember(num_channels=self.num_channels, eps=self.eps)
        c = self.num_channels
        self.register_buffer("mu", torch.full((c,), float("nan"), dtype=_F64))
        self.register_buffer("cov_factor", torch.full((c, c), float("nan"), dtype=_F64))
        self._init_fit_flag()

    @property
    def requires_initial_fit(self) -> bool:  # noqa: D102
        return True

    def _factor(self) -> Tensor:
        lower = torch.tril(self.cov_factor, diagonal=-1)
        return lower + torch.diag_embed(torch.diagonal(self.cov_factor).abs())

    @property
    def sigma(self) -> Tensor:
        """The (regularized) covariance ``L L^T`` (C, C), float64."""
        f = self._factor()
        return f @ f.T

    @sigma.setter
    def sigma(self, value: Tensor) -> None:
        self._set_covariance(value.to(_F64), add_eps=False)
        if bool(torch.isfinite(self.mu).all()):
            self._mark_fitted()

    def _set_covariance(self, cov: Tensor, *, add_eps: bool) -> None:
        c = self.num_channels
        if cov.shape != (c, c):
            raise CubelineError(
                f"node {self.name!r}: covariance must be ({c}, {c}), got {tuple(cov.shape)}"
            )
        cov = (cov + cov.T) * 0.5
        if add_eps and self.eps:
            cov = cov + self.eps * torch.eye(c, dtype=_F64, device=cov.device)
        factor, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise CubelineError(
                f"node {self.name!r}: the covariance of its {c} input channels is not positive "
                f"definite (Cholesky failed at column {int(info)}); raise RXGlobal eps (now "
                f"{self.eps:g}), select fewer or less correlated channels, or fit on more pixels"
            )
        self.cov_factor = factor.to(self.cov_factor.device)

    def fit_from_moments(self, moments: MomentState) -> None:
        """Mean and unbiased covariance (ddof = 1) of the input pixels."""
        if moments.num_channels != self.num_channels:
            raise CubelineError(
                f"node {self.name!r} expects {self.num_channels} channels, data has "
                f"{moments.num_channels}"
            )
        self.mu = moments.mean.to(device=self.mu.device, dtype=_F64).clone()
        self._set_covariance(moments.cov(ddof=1).to(self.mu.device), add_eps=True)
        self._mark_fitted()

    def forward(self, data: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Score ``data`` (B, H, W, C) → (B, H, W)."""
        self.check_initialized()
        shape = data.shape[:-1]
        diff = data.reshape(-1, data.shape[-1]).to(_F64) - self.mu
        # diff @ L^{-T}: rows are L^{-1}(x - mu), so the score is their squared norm.
        z = torch.linalg.solve_triangular(self._factor().T, diff, upper=True, left=False)
        scores = (z * z).sum(dim=-1)
        return {"scores": scores.reshape(shape).to(data.dtype)}
