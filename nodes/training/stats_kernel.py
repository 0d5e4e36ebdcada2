"""The compiled inner loop of the blocked Phase-1 pass: one read of a block does all but the GEMM.

:func:`convert_block` reads a block of float32 (or float64) pixels once and, per value, writes its
float64 shift into the block buffer that the Gram kernel reads next, adds it to the running
column sums and folds the raw value into the running min and max. The NumPy calls it replaced
(one mixed-dtype ``subtract``, which NumPy runs through a cast buffer, a min/max fold and a
``gemv`` for the sums) read the block four times and cost 1.5x the Gram product on a 2-vCPU Xeon;
this loop runs at the speed of reading the input. Compiled with Numba when first imported and
cached on disk next to this file (or in ``NUMBA_CACHE_DIR``); a later process loads it in about
0.4 s (Numba's LLVM set-up), so :mod:`nodes.training.stats_blocked` imports it on first use
only. It runs without the GIL, so the pool workers run it side by side.
"""

from __future__ import annotations

import numba
import numpy as np

#: The layouts it is compiled for, at import (from the on-disk cache after the first time): a
#: float32 or float64 block and its own dtype's min/max, all C-contiguous.
SIGNATURES = [f"void({t}[:, ::1], float64[::1], float64[:, ::1], float64[::1], {t}[::1], {t}[::1])"
              for t in ("float32", "float64")]


@numba.njit(SIGNATURES, nogil=True, cache=True, error_model="numpy")
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
