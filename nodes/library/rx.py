"""Global RX anomaly detector (Reed & Xiaoli 1990).

The score of a pixel is its squared Mahalanobis distance to the background,
``(x - mu)^T (Sigma + eps I)^{-1} (x - mu)``. We keep the Cholesky factor ``L`` of
``Sigma + eps I`` (float64) and score ``||L^{-1}(x - mu)||^2``: the covariance is never inverted,
which matters on the nearly singular covariances of adjacent bands. ``L^{-1}`` comes from one
triangular solve against the identity (C x C, cached while the factor does not change), so scoring
a batch is a single matrix product instead of a row-by-row substitution (on the CPU without
autograd, in cache-sized blocks of rows over worker threads). The factor
is also the Phase-2 parameterization of the precision: ``L L^T`` stays symmetric positive
definite whatever the optimizer does to the lower triangle (the diagonal enters by magnitude).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from nodes.errors import CubelineError
from nodes.graph.base import Node, unfitted
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node
from nodes.hardware import (
    gemm_kernel,
    pool,
    rows_in_cache,
    single_threaded_blas,
    thread_arrays,
    worker_count,
)
from nodes.training.stats import MomentState

_F64 = torch.float64
#: Bytes per work buffer of a CPU scoring block; None: from the L2 size (:func:`_block_rows`).
_BLOCK_BYTES: int | None = None
#: Fewest rows per CPU scoring block.
_MIN_BLOCK_ROWS = 256
#: Bytes of a scoring block's two work buffers per byte of L2, by GEMM kernel
#: (:func:`nodes.hardware.gemm_kernel`): OpenBLAS (NumPy) in half of L2; MKL (torch), whose
#: per-call set-up weighs on the thin ``rows x C x C`` product, scored 262144 px x 61 bands
#: 15-20 % faster on a 2-vCPU Xeon with 4x L2 than with half of it.
_L2_SHARE = {"numpy": 0.5, "torch": 4.0}
_SCORE_DTYPES = ("auto", "float64", "float32")


@register_node
class RXGlobal(Node):
    """Global Reed-Xiaoli detector with float64 statistics.

    Buffers: ``mu`` (C,) the background mean; ``cov_factor`` (C, C) the lower Cholesky factor of
    ``Sigma + eps I``. ``sigma`` (C, C) is derived from it (and can be assigned).

    Args:
        num_channels: Number of input channels C.
        eps: Ridge added to the covariance diagonal (0 reproduces textbook RX).
        score_dtype: The dtype of the scoring product. ``"auto"`` (default): float64 for
            float64 input, float32 otherwise. ``"float64"``: always float64.
            ``"float32"``: always float32. Statistics are float64 in every mode; ``L^{-1}`` and
            the mean are derived in float64 and rounded once, and the mean's rounding error is
            carried as a float64-derived bias, so a large offset does not cancel. Measured max
            relative score error of float32 vs float64 scoring: 2.1e-5 on the raw ABU scenes
            (C = 188 to 207, cond(Sigma) up to 4e8; AUCs equal to 5 digits), under 1e-5 on
            synthetic cubes, also with a mean of 1e5. On the CPU at C = 61, float32 scoring is
            2 to 4 times as fast as float64.
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "data": PortSpec("float", ("B", "H", "W", "num_channels"), "pixels to score"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "scores": PortSpec("float", ("B", "H", "W"), "squared Mahalanobis distance"),
    }
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ("mu", "cov_factor")
    DEFAULT_NAME: ClassVar[str | None] = "rx_detector"
    MAIN_INPUT: ClassVar[str | None] = "data"
    mu: Tensor
    cov_factor: Tensor

    def __init__(self, num_channels: int, eps: float = 1e-6, score_dtype: str = "auto",
                 name: str | None = None, execution_stages: Iterable[str] | None = None) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        if score_dtype not in _SCORE_DTYPES:
            raise CubelineError(
                f"RXGlobal score_dtype must be one of {_SCORE_DTYPES}, got {score_dtype!r}"
            )
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.score_dtype = score_dtype
        self._remember(num_channels=self.num_channels, eps=self.eps, score_dtype=score_dtype)
        self._whitener_cache: (
            tuple[tuple[object, ...], tuple[Tensor, Tensor, Tensor | None]] | None
        ) = None
        c = self.num_channels
        self.declare_fitted(mu=unfitted(c, dtype=_F64), cov_factor=unfitted(c, c, dtype=_F64))

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

    def _score_dtype(self, data: Tensor) -> torch.dtype:
        """The dtype scores are computed in for ``data`` (see the class docstring)."""
        if self.score_dtype == "float64":
            return _F64
        if self.score_dtype == "float32":
            return torch.float32
        return _F64 if data.dtype == _F64 else torch.float32

    def _whitener(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(W, mu_hi, bias)`` in ``dtype`` with ``W = L^{-1}``; cached while frozen.

        ``mu_hi`` is ``mu`` rounded to ``dtype``; what the rounding dropped, ``mu_lo = mu - mu_hi``
        (float64), is carried as the bias ``-W mu_lo`` (computed in float64, rounded once), so
        ``W (x - mu_hi) + bias = W (x - mu)`` even where ``|mu|`` dwarfs the spread of the data
        (raw sensor counts): the float32 shift itself is exact or relative to ``x - mu``. ``bias``
        is None in float64, where ``mu_lo`` is zero.
        """
        frozen = not (self.cov_factor.requires_grad or self.mu.requires_grad)
        key = (self.cov_factor.data_ptr(), self.cov_factor._version, self.mu.data_ptr(),
               self.mu._version, self.cov_factor.device, dtype)
        if frozen and self._whitener_cache is not None and self._whitener_cache[0] == key:
            return self._whitener_cache[1]
        factor = self._factor()
        eye = torch.eye(self.num_channels, dtype=_F64, device=factor.device)
        w64 = torch.linalg.solve_triangular(factor, eye, upper=False)
        bias: Tensor | None = None
        if dtype == _F64:
            mu_hi = self.mu
        else:
            mu_hi = self.mu.to(dtype)
            mu_lo = self.mu - mu_hi.to(_F64)  # exact in float64; its gradient is zero
            bias = -(w64 @ mu_lo).to(dtype)
        out = (w64.to(dtype), mu_hi, bias)
        if frozen:
            self._whitener_cache = (key, out)
        return out

    def forward(self, data: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Score ``data`` (B, H, W, C) → (B, H, W)."""
        self.check_initialized()
        shape = data.shape[:-1]
        dtype = self._score_dtype(data)
        w, mu_hi, bias = self._whitener(dtype)
        x = data.reshape(-1, data.shape[-1])
        needs_grad = torch.is_grad_enabled() and (
            data.requires_grad or self.mu.requires_grad or self.cov_factor.requires_grad
        )
        if needs_grad or x.device.type != "cpu":
            # Differentiable (Phase 2) and accelerator path: whole-batch tensor ops.
            z = (x.to(dtype) - mu_hi) @ w.T  # rows are L^{-1}(x - mu)
            if bias is not None:
                z = z + bias
            scores = z.square().sum(dim=-1)
        else:
            scores = _score_rows_cpu(x, w, mu_hi, bias)
        return {"scores": scores.reshape(shape).to(data.dtype)}


def _block_rows(c: int, itemsize: int) -> int:
    """Rows per scoring block: two (rows, c) work buffers in a share of this machine's L2.

    The share depends on the GEMM kernel (:data:`_L2_SHARE`).
    """
    if _BLOCK_BYTES is not None:
        return max(1, _BLOCK_BYTES // max(1, c * itemsize))
    return rows_in_cache(2 * c * itemsize, _L2_SHARE[gemm_kernel()], _MIN_BLOCK_ROWS)


def _score_rows_cpu(x: Tensor, w: Tensor, mu_hi: Tensor, bias: Tensor | None) -> Tensor:
    """``||W (x - mu_hi) + bias||^2`` per row of ``x`` (N, C), in ``w.dtype``, without autograd.

    The rows are split into a few stripes per worker thread (:func:`nodes.hardware.worker_count`),
    pulled from a queue; each stripe is walked in cache-sized blocks (:func:`_block_rows`, from
    the L2 size read at run time): the shift into one work buffer
    (:func:`nodes.kernels.shift_block`), one GEMM into the other with the machine's BLAS
    (:func:`nodes.hardware.gemm_kernel`), the bias and row-wise sum of squares into the output
    (:func:`nodes.kernels.sum_squares`), while the block is in cache. BLAS runs single-threaded
    inside the workers (the pool caps OpenMP and MKL per worker, threadpoolctl the rest), so
    there is no parallel region (and no thread barrier that a busy machine could stall) per op.
    The work buffers are each thread's reused scratch (:func:`nodes.hardware.thread_arrays`).
    """
    from nodes import kernels  # compiled on first use (see its module doc)

    n, c = x.shape
    dtype = w.dtype
    rows = min(n, _block_rows(c, w.element_size()))
    workers = max(1, min(worker_count(), n // max(1, 4 * rows)))
    xd = x.detach()
    if xd.dtype not in (torch.float32, torch.float64):
        xd = xd.to(torch.float32)  # float16, bfloat16: widened (exact), NumPy has no bfloat16
    xn = xd.contiguous().numpy()
    wt = w.T.contiguous().numpy()
    # The shift in the wider of the two dtypes, as NumPy's mixed subtract would take it.
    wide = torch.float64 if torch.float64 in (xd.dtype, dtype) else dtype
    mu = mu_hi.detach().to(wide).numpy()
    bn = np.zeros(c, dtype=wt.dtype) if bias is None else bias.detach().numpy()
    blocks = -(-n // rows)
    # A few stripes per worker, pulled from the pool's queue (load balancing on a shared core).
    tasks = 1 if workers == 1 else min(blocks, 4 * workers)
    bounds = [min(n, (blocks * i // tasks) * rows) for i in range(tasks + 1)]
    out = np.empty(n, dtype=wt.dtype)
    mkl = gemm_kernel() == "torch"
    wt_t = torch.from_numpy(wt)

    def stripe(i: int) -> None:
        dn, zn = thread_arrays("rx.block", (rows, c), wt.dtype, count=2)
        dt, zt = torch.from_numpy(dn), torch.from_numpy(zn)
        for start in range(bounds[i], bounds[i + 1], rows):
            stop = min(bounds[i + 1], start + rows)
            k = stop - start
            kernels.shift_block(xn[start:stop], mu, dn[:k])
            if mkl:
                torch.mm(dt[:k], wt_t, out=zt[:k])
            else:
                np.matmul(dn[:k], wt, out=zn[:k])
            kernels.sum_squares(zn[:k], bn, out[start:stop])

    if tasks == 1:
        stripe(0)
    else:
        with single_threaded_blas():
            list(pool(workers).map(stripe, range(tasks)))
    return torch.from_numpy(out)
