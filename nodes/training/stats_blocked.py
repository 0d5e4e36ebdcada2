"""Phase-1 sums on the CPU in one blocked pass: cache-sized pixel blocks over worker threads.

For a batch ``x`` (N, C) of any float dtype and a float64 shift ``s`` (C,), :func:`blocked_sums`
returns the float64 column sums and Gram matrix of ``y = x - s`` and the per-channel min/max of
``x``, reading ``x`` once. The rows are split into a few contiguous stripes per worker
thread; a worker walks each stripe it takes in blocks of :func:`block_rows` pixels, sized from
the L2 cache the machine reports, and per block

1. converts and shifts the block into the thread's reused float64 buffer with one NumPy
   ``float32 - float64`` call (the batch is never materialized in float64),
2. folds the block's min/max into the stripe's running min/max (:class:`_Extremes`: the block
   viewed as rows of ``64 x C`` values, so each call is a long vector loop) while the block
   is still in cache from step 1,
3. adds the block's Gram matrix with the kernel :func:`gram_kernel` picks for the machine
   (:func:`gram_adder`) and its column sums with one ``?gemv``.

The loop makes a handful of NumPy calls per block, each a long GIL-free kernel, and no torch
calls: torch ops started from several Python threads each bring up an OpenMP team whose idle
threads spin on the same cores, which measured twice as slow on a 2-vCPU Xeon, and many short
calls per block (the min/max fold by repeated halving that this replaced) keep the threads
queueing for the GIL.

Every stripe has its own accumulators; since all use the same shift, the stripes' sums add up
exactly as the blocks of one worker do, and the caller merges the batch into its state with the
Chan et al. formula. While workers run, BLAS is capped at one thread per worker
(:func:`nodes.hardware.single_threaded_blas`), so the threads do not oversubscribe the cores.
Cache size and worker count come from :mod:`nodes.hardware`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch

from nodes.hardware import (
    cache_size,
    cpu_vendor,
    pool,
    single_threaded_blas,
    thread_arrays,
    worker_count,
)

#: Share of the L2 cache the float64 block buffer may fill: the rest holds the input block, the
#: Gram accumulator and the BLAS kernel's packed panels.
L2_SHARE = 0.5
#: Fewest rows per block: below this the per-block call overhead dominates.
MIN_BLOCK_ROWS = 256
#: Fewest rows per worker: smaller batches run on one thread.
MIN_STRIPE_ROWS = 16_384
#: Stripes per worker thread (load balancing on a shared machine).
STRIPES_PER_WORKER = 4

def block_rows(channels: int, in_itemsize: int = 4, l2_bytes: int | None = None) -> int:
    """Pixels per block so that one float64 block and its input fill :data:`L2_SHARE` of L2.

    Args:
        channels: Channels C of a pixel.
        in_itemsize: Bytes per input value (4 for float32).
        l2_bytes: L2 size; default :func:`nodes.hardware.cache_size` of level 2.

    Returns:
        Rows per block, a multiple of 64 and at least :data:`MIN_BLOCK_ROWS`.
    """
    l2 = cache_size(2) if l2_bytes is None else l2_bytes
    per_row = (channels + 1) * 8 + channels * in_itemsize
    rows = int(l2 * L2_SHARE) // max(1, per_row)
    return max(MIN_BLOCK_ROWS, rows // 64 * 64)


Sums = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]

#: Rows folded side by side into the running min/max: ``lanes x C`` values per elementwise
#: call, so each call is one long vector loop instead of ``C``-wide rows.
MINMAX_LANES = 64
#: Input dtypes the block loop reads through NumPy; others are converted to float32 first.
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


class _Extremes:
    """Running per-channel min and max of float rows, folded a block at a time.

    A block of ``k`` rows is viewed as ``k // lanes`` rows of ``lanes * C`` values and reduced
    over its first axis into a ``lanes * C`` running row: two long NumPy calls per block and per
    extreme, whatever ``k``, so worker threads spend little time holding the GIL. The ``k % lanes``
    rows left over go to a per-channel row; :meth:`result` folds the lanes into it.
    """

    def __init__(self, channels: int, dtype: np.dtype, lanes: int = MINMAX_LANES) -> None:
        self.c = channels
        self.lanes = lanes
        self.lo = np.full(lanes * channels, np.inf, dtype=dtype)
        self.hi = np.full(lanes * channels, -np.inf, dtype=dtype)
        self.lo_rest = np.full(channels, np.inf, dtype=dtype)
        self.hi_rest = np.full(channels, -np.inf, dtype=dtype)
        self._tmp = np.empty(lanes * channels, dtype=dtype)

    def fold(self, block: np.ndarray) -> None:
        """Fold the rows of ``block`` (k, C), C-contiguous."""
        k = block.shape[0]
        whole = k - k % self.lanes
        if whole:
            v = block[:whole].reshape(-1, self.lanes * self.c)
            np.minimum.reduce(v, axis=0, out=self._tmp)
            np.minimum(self.lo, self._tmp, out=self.lo)
            np.maximum.reduce(v, axis=0, out=self._tmp)
            np.maximum(self.hi, self._tmp, out=self.hi)
        if whole < k:
            rest = block[whole:]
            np.minimum(self.lo_rest, rest.min(axis=0), out=self.lo_rest)
            np.maximum(self.hi_rest, rest.max(axis=0), out=self.hi_rest)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(min, max)`` as float64."""
        lo = np.minimum(self.lo.reshape(self.lanes, self.c).min(axis=0), self.lo_rest)
        hi = np.maximum(self.hi.reshape(self.lanes, self.c).max(axis=0), self.hi_rest)
        return lo.astype(np.float64), hi.astype(np.float64)


#: Environment variable that pins the Gram kernel (``torch`` or ``numpy``) over the default.
GRAM_KERNEL_ENV = "CUBELINE_GRAM_KERNEL"


@functools.cache
def gram_kernel() -> str:
    """Which BLAS adds a block's Gram matrix: ``"torch"`` (its MKL ``?gemm``) or ``"numpy"``.

    Chosen once per process from what the machine reports, so that a machine always takes the
    same kernel (Phase-1 results are bit-for-bit repeatable on it): torch's MKL on an Intel CPU
    where torch was built with MKL (MKL's ``dgemm`` measured 20 % faster there than OpenBLAS's
    ``dsyrk`` on the same blocks), NumPy's OpenBLAS ``?syrk`` elsewhere (AMD EPYC, where it was
    the faster one, and non-MKL builds). ``CUBELINE_GRAM_KERNEL=torch|numpy`` pins it.
    """
    pinned = os.environ.get(GRAM_KERNEL_ENV, "").strip().lower()
    if pinned in ("torch", "numpy"):
        return pinned
    mkl = torch.backends.mkl.is_available()
    return "torch" if mkl and cpu_vendor() == "GenuineIntel" else "numpy"


def gram_adder(gram: np.ndarray, buf: np.ndarray) -> Callable[[int], None]:
    """``add(k)``: ``gram += buf[:k].T @ buf[:k]`` in place, with the :func:`gram_kernel`.

    ``torch``: MKL ``?gemm`` into the accumulator (on pool workers torch runs with OpenMP and
    MKL capped at one thread, :func:`nodes.hardware.pool`); ``numpy``: NumPy dispatches
    ``b.T @ b`` on one buffer to BLAS ``?syrk``.
    """
    gram_t, buf_t = torch.from_numpy(gram), torch.from_numpy(buf)

    def add_mkl(k: int) -> None:
        gram_t.addmm_(buf_t[:k].T, buf_t[:k])

    def add_syrk(k: int) -> None:
        b = buf[:k]
        gram.__iadd__(b.T @ b)

    return add_mkl if gram_kernel() == "torch" else add_syrk


def _stripe_sums(x: np.ndarray, shift: np.ndarray, rows: int, minmax: bool) -> Sums:
    """Column sums, Gram matrix and min/max of one stripe, block by block (see module doc)."""
    n, c = x.shape
    (b_all,) = thread_arrays("moments.block", (rows, c), np.float64)
    ones = np.ones(rows)
    gram = np.zeros((c, c))
    ysum = np.zeros(c)
    add_gram = gram_adder(gram, b_all)
    ext = _Extremes(c, x.dtype) if minmax else None
    for start in range(0, n, rows):
        xb = x[start : start + rows]
        k = xb.shape[0]
        b = b_all[:k]
        np.subtract(xb, shift, out=b)  # convert + shift: one vectorized pass, in cache
        if ext is not None:
            ext.fold(xb)
        add_gram(k)
        ysum += ones[:k] @ b
    if ext is None:
        return ysum, gram, None, None
    lo, hi = ext.result()
    return ysum, gram, lo, hi


def blocked_sums(x: torch.Tensor, shift: torch.Tensor, *, track_minmax: bool = True,
                 rows: int | None = None, workers: int | None = None) -> Sums:
    """Float64 ``(sum y, y^T y, min x, max x)`` of ``y = x - shift`` in one blocked pass.

    Args:
        x: Samples (N, C) on the CPU, any float dtype; read once, never copied whole (unless
            not contiguous).
        shift: Float64 reference point (C,) subtracted before the sums.
        track_minmax: Also return the per-channel min and max of ``x`` (else None, None).
        rows: Pixels per block; default :func:`block_rows` from the L2 size.
        workers: Threads; default :func:`nodes.hardware.worker_count`, fewer where stripes
            would be small.

    Returns:
        ``(ysum (C,), gram (C, C), lo (C,) or None, hi (C,) or None)``, all float64.
    """
    n, c = x.shape
    x = x.detach()
    if x.dtype not in _NUMPY_DTYPES:  # bfloat16 and the like: NumPy has no such dtype
        x = x.float()
    rows = rows or block_rows(c, x.element_size())
    xn = x.contiguous().numpy()
    rows = max(1, min(rows, n))
    s = shift.detach().to(torch.float64).contiguous().numpy()
    w = max(1, min(workers or worker_count(), n // MIN_STRIPE_ROWS))
    if w == 1:
        return _stripe_sums(xn, s, rows, track_minmax)
    # Stripes on block boundaries, so the blocks are the same whatever the worker count; a few
    # stripes per worker, pulled from the pool's queue, so that a worker whose core is shared
    # with another process takes fewer of them instead of holding the whole batch back.
    blocks = -(-n // rows)
    tasks = min(blocks, w * STRIPES_PER_WORKER)
    bounds = [min(n, (blocks * i // tasks) * rows) for i in range(tasks + 1)]
    with single_threaded_blas():
        parts = list(pool(w).map(
            lambda i: _stripe_sums(xn[bounds[i] : bounds[i + 1]], s, rows, track_minmax),
            range(tasks)))
    ysum = parts[0][0]
    gram = parts[0][1]
    for p in parts[1:]:
        ysum += p[0]
        gram += p[1]
    if not track_minmax:
        return ysum, gram, None, None
    lo = np.minimum.reduce([p[2] for p in parts if p[2] is not None])
    hi = np.maximum.reduce([p[3] for p in parts if p[3] is not None])
    return ysum, gram, lo, hi
