"""Phase-1 sums on the CPU in one blocked pass: pixel blocks over worker threads.

For a batch ``x`` (N, C) of any float dtype and a float64 shift ``s`` (C,), :func:`blocked_sums`
returns the float64 column sums and Gram matrix of ``y = x - s`` and the per-channel min/max of
``x``, reading ``x`` once. The rows are split into a few contiguous stripes per worker
thread; a worker walks each stripe it takes in blocks of :func:`block_rows` pixels, sized from
the L2 cache the machine reports and the Gram kernel, and per block

1. reads the block once with the compiled loop :func:`nodes.kernels.convert_block`:
   it writes the shifted float64 values into the thread's reused block buffer (the batch is
   never materialized in float64), adds them to the stripe's column sums and folds the raw
   values into the stripe's min/max;
2. adds the block's Gram matrix with the kernel :func:`gram_kernel` picks for the machine
   (:func:`gram_adder`).

Both steps run without the GIL, so the workers run side by side; the loop makes no torch call
that could start an OpenMP team (the pool's workers cap theirs at one thread anyway,
:func:`nodes.hardware.pool`).

Every stripe has its own accumulators; since all use the same shift, the stripes' sums add up
exactly as the blocks of one worker do, and the caller merges the batch into its state with the
Chan et al. formula. While workers run, BLAS is capped at one thread per worker
(:func:`nodes.hardware.single_threaded_blas`), so the threads do not oversubscribe the cores.
Cache size and worker count come from :mod:`nodes.hardware`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from nodes.hardware import (
    gemm_kernel,
    pool,
    rows_in_cache,
    single_threaded_blas,
    thread_arrays,
    worker_count,
)

#: Bytes of the block buffer (float64) and its input per byte of L2, by Gram kernel. OpenBLAS's
#: ``dsyrk`` (NumPy) was fastest on AMD EPYC with the block in half of L2; MKL's ``dgemm``
#: (torch), whose per-call set-up weighs on the small ``C x C`` product, was 25 % faster on a
#: 2-vCPU Xeon with blocks of 4x L2 (8k-16k rows at C = 61) than with L2-sized ones.
L2_SHARE = {"numpy": 0.5, "torch": 4.0}
#: Fewest rows per block: below this the per-block call overhead dominates.
MIN_BLOCK_ROWS = 256
#: Fewest rows per worker: smaller batches run on one thread.
MIN_STRIPE_ROWS = 16_384
#: Stripes per worker thread (load balancing on a shared machine).
STRIPES_PER_WORKER = 4


def block_rows(channels: int, in_itemsize: int = 4, l2_bytes: int | None = None,
               kernel: str | None = None) -> int:
    """Pixels per block: one float64 block and its input fill :data:`L2_SHARE` of L2.

    Args:
        channels: Channels C of a pixel.
        in_itemsize: Bytes per input value (4 for float32).
        l2_bytes: L2 size; default :func:`nodes.hardware.cache_size` of level 2.
        kernel: Gram kernel (``"torch"`` or ``"numpy"``); default :func:`gram_kernel`.

    Returns:
        Rows per block, a multiple of 64 and at least :data:`MIN_BLOCK_ROWS`.
    """
    return rows_in_cache(channels * (8 + in_itemsize), L2_SHARE[kernel or gram_kernel()],
                         MIN_BLOCK_ROWS, l2_bytes)


Sums = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]

#: Input dtypes the compiled block loop reads; others (float16, bfloat16) are converted to float32
#: first.
_KERNEL_DTYPES = (torch.float32, torch.float64)


#: The Gram kernel: the machine's GEMM library (:func:`nodes.hardware.gemm_kernel`).
gram_kernel = gemm_kernel


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
    gram = np.zeros((c, c))
    ysum = np.zeros(c)
    lo = np.full(c, np.inf, dtype=x.dtype)
    hi = np.full(c, -np.inf, dtype=x.dtype)
    add_gram = gram_adder(gram, b_all)
    convert = _convert_block()
    for start in range(0, n, rows):
        xb = x[start : start + rows]
        k = xb.shape[0]
        convert(xb, shift, b_all[:k], ysum, lo, hi)
        add_gram(k)
    if not minmax:
        return ysum, gram, None, None
    return ysum, gram, lo.astype(np.float64), hi.astype(np.float64)


@functools.cache
def _convert_block() -> Callable[..., None]:
    """The compiled block loop, imported (and compiled or loaded from cache) on first use."""
    from nodes.kernels import convert_block

    return convert_block


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
    if x.dtype not in _KERNEL_DTYPES:  # float16, bfloat16: widened to float32 (exact)
        x = x.float()
    rows = rows or block_rows(c, x.element_size())
    xn = x.contiguous().numpy()
    rows = max(1, min(rows, n))
    s = shift.detach().to(torch.float64).contiguous().numpy()
    w = max(1, min(workers or worker_count(), n // MIN_STRIPE_ROWS))
    _convert_block()  # load (or compile) it here, before the workers would all wait for it
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
