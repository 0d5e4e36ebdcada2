"""Compiled inner loops of the CPU paths: the work around BLAS, one read of each block, no GIL.

- :func:`convert_block` (Phase 1, :mod:`nodes.training.stats_blocked`) reads a block of float32
  (or float64) pixels once and, per value, writes its float64 shift into the block buffer that
  the Gram kernel reads next, adds it to the running column sums and folds the raw value into
  the running min and max. The NumPy calls it replaced (one mixed-dtype ``subtract``, which
  NumPy runs through a cast buffer, a min/max fold and a ``gemv`` for the sums) read the block
  four times and cost 1.5x the Gram product on a 2-vCPU Xeon; this loop runs at about the speed
  of reading the input.
- :func:`shift_block` and :func:`sum_squares` (RX scoring, :mod:`nodes.library.rx`): the shift
  before the whitening GEMM, and the bias and row-wise sum of squares after it. NumPy's
  broadcast subtract and ``einsum`` walk rows of only C values; these loops took the work
  around the GEMM from 45 % to 25 % of RX scoring's time.

Compiled with Numba for the layouts in each ``SIGNATURES`` when this module is first imported,
and cached on disk next to this file (or in ``NUMBA_CACHE_DIR``); a later process loads them in
about 0.4 s (Numba's LLVM set-up), so the CPU paths import this module on first use only. All
run without the GIL, so the worker threads of :mod:`nodes.hardware` run them side by side.
"""

from __future__ import annotations

import numba
import numpy as np

_FLOATS = ("float32", "float64")
#: Layouts of :func:`convert_block`: a float32 or float64 block and its own dtype's min/max, all
#: C-contiguous.
CONVERT_SIGNATURES = [
    f"void({t}[:, ::1], float64[::1], float64[:, ::1], float64[::1], {t}[::1], {t}[::1])"
    for t in _FLOATS]
#: Layouts of :func:`shift_block` (block, shift, output), C-contiguous: one dtype, or a float64
#: shift and a block and output of which one is float32 (the difference taken in float64).
SHIFT_SIGNATURES = [f"void({x}[:, ::1], {s}[::1], {o}[:, ::1])" for x, s, o in (
    ("float32", "float32", "float32"), ("float64", "float64", "float64"),
    ("float64", "float64", "float32"), ("float32", "float64", "float64"))]
#: Layouts of :func:`sum_squares`: block, bias and output of one dtype, C-contiguous.
SUM_SQUARES_SIGNATURES = [f"void({t}[:, ::1], {t}[::1], {t}[::1])" for t in _FLOATS]


@numba.njit(CONVERT_SIGNATURES, nogil=True, cache=True, error_model="numpy")
def convert_block(x: np.ndarray, shift: np.ndarray, out: np.ndarray, ysum: np.ndarray,
                  lo: np.ndarray, hi: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out = x - shift`` in float64; ``ysum += out.sum(0)``; fold ``x`` into ``lo``/``hi``.

    Args:
        x: Block (k, C), C-contiguous, float32 or float64.
        shift: Float64 reference point (C,).
        out: Float64 buffer (k, C), C-contiguous, overwritten.
        ysum: Float64 running column sums of the shifted values (C,), updated.
        lo: Running per-channel minimum (C,) of ``x``'s dtype, updated; a NaN stays, as with
            ``np.minimum``.
        hi: Running per-channel maximum, the same.
    """
    k, c = x.shape
    for i in range(k):
        for j in range(c):
            v = x[i, j]
            y = np.float64(v) - shift[j]
            out[i, j] = y
            ysum[j] += y
            if v < lo[j] or v != v:
                lo[j] = v
            if v > hi[j] or v != v:
                hi[j] = v


@numba.njit(SHIFT_SIGNATURES, nogil=True, cache=True, error_model="numpy")
def shift_block(x: np.ndarray, shift: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out = x - shift`` row by row (x (k, C), shift (C,), out (k, C)); see the signatures."""
    k, c = x.shape
    for i in range(k):
        for j in range(c):
            out[i, j] = x[i, j] - shift[j]


# The sum over a row may be reassociated (vectorized): scores are a float32 or float64 sum of C
# squares, as exact in any order; the order is fixed per machine by the compiled code.
@numba.njit(SUM_SQUARES_SIGNATURES, nogil=True, cache=True, error_model="numpy",
            fastmath={"reassoc", "contract"})
def sum_squares(z: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out[i] = sum_j (z[i, j] + bias[j])^2`` (z (k, C), bias (C,), out (k,), one dtype)."""
    k, c = z.shape
    for i in range(k):
        acc = z.dtype.type(0)
        for j in range(c):
            v = z[i, j] + bias[j]
            acc += v * v
        out[i] = acc
