"""Global RX anomaly detector (Reed & Xiaoli 1990).

The score of a pixel is its squared Mahalanobis distance to the background,
``(x - mu)^T (Sigma + eps I)^{-1} (x - mu)``. We keep the Cholesky factor ``L`` of
``Sigma + eps I`` (float64) and score ``||L^{-1}(x - mu)||^2``: the covariance is never inverted,
which matters on the nearly singular covariances of adjacent bands. ``L^{-1}`` comes from one
triangular solve against the identity (C x C, cached while the factor does not change), so scoring
a batch is a single matrix product instead of a row-by-row substitution. The factor
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
        score_dtype: ``"float64"`` (default: exact even on ill-conditioned raw bands) or
            ``"float32"`` (about twice as fast; fine on normalized, selected channels).
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

    def __init__(self, num_channels: int, eps: float = 1e-6, score_dtype: str = "float64",
                 name: str | None = None, **kwargs: object) -> None:
        super().__init__(name=name, **kwargs)  # type: ignore[arg-type]
        if score_dtype not in ("float64", "float32"):
            raise CubelineError(
                f"RXGlobal score_dtype must be 'float64' or 'float32', got {score_dtype!r}"
            )
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.score_dtype = score_dtype
        self._remember(num_channels=self.num_channels, eps=self.eps, score_dtype=score_dtype)
        self._whitener_cache: tuple[tuple[object, ...], Tensor, Tensor] | None = None
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

    def _whitener(self) -> tuple[Tensor, Tensor]:
        """``(W, mu)`` in the scoring dtype, with ``W = L^{-1}``; cached while both are frozen."""
        dtype = torch.float64 if self.score_dtype == "float64" else torch.float32
        frozen = not (self.cov_factor.requires_grad or self.mu.requires_grad)
        key = (self.cov_factor.data_ptr(), self.cov_factor._version, self.mu.data_ptr(),
               self.mu._version, self.cov_factor.device, dtype)
        if frozen and self._whitener_cache is not None and self._whitener_cache[0] == key:
            return self._whitener_cache[1], self._whitener_cache[2]
        factor = self._factor()
        eye = torch.eye(self.num_channels, dtype=_F64, device=factor.device)
        w = torch.linalg.solve_triangular(factor, eye, upper=False).to(dtype)
        mu = self.mu.to(dtype)
        if frozen:
            self._whitener_cache = (key, w, mu)
        return w, mu

    def forward(self, data: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Score ``data`` (B, H, W, C) → (B, H, W)."""
        self.check_initialized()
        shape = data.shape[:-1]
        w, mu = self._whitener()
        diff = data.reshape(-1, data.shape[-1]).to(w.dtype) - mu
        z = diff @ w.T  # rows are L^{-1}(x - mu)
        scores = torch.linalg.vector_norm(z, dim=-1).square()
        return {"scores": scores.reshape(shape).to(data.dtype)}
