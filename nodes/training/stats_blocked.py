"""Phase-1 sums on the CPU in one blocked pass: cache-sized pixel blocks over worker threads.

For a batch ``x`` (N, C) of any float dtype and a float64 shift ``s`` (C,), :func:`blocked_sums`
returns the float64 column sums and Gram matrix of ``y = x - s`` and the per-channel min/max of
``x``, reading ``x`` once. The rows are split into a few contiguous stripes per worker
thread; a worker walks each stripe it takes in blocks of :func:`block_rows` pixels, sized from
the L2 cache the machine reports, and per block

1. converts and shifts the block into a reused float64 buffer (torch's vectorized
   ``float32 - float64``, in calls of at most its intra-op grain size so no OpenMP team starts
   inside a worker; the batch is never materialized in float64),
2. adds the block's Gram matrix with one symmetric rank-k update (NumPy dispatches ``b.T @ b``
   on one buffer to BLAS ``?syrk``) and its column sums with one ``?gemv``,
3. folds the block's min/max into the stripe's running min/max by halving the float32 block
   (long vector loops) while it is in cache.

Every stripe has its own accumulators; since all use the same shift, the stripes' sums add up
exactly as the blocks of one worker do, and the caller merges the batch into its state with the
Chan et al. formula. While workers run, BLAS is capped at one thread per worker
(:func:`nodes.hardware.single_threaded_blas`), so the threads do not oversubscribe the cores.
Cache size and worker count come from :mod:`nodes.hardware`.
"""

from __future__ import annotations

import numpy as np
import torch

from nodes.hardware import cache_size, pool, single_threaded_blas, worker_count

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

#: Elements per conversion call: torch runs an elementwise op of at most this many elements
#: (its intra-op grain size) on the calling thread, so worker threads never fork OpenMP teams.
_CONVERT_ELEMENTS = 1 << 15


def _fold_extreme(op: np.ufunc, block: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> None:
    """``out = op(out, op.reduce(block, axis=0))`` by halving the block in ``scratch``.

    Each halving is one elementwise call over a contiguous half of the block (long vector
    loops), where a reduction over axis 0 would make one short call per row.
    """
    k = block.shape[0]
    src = block
    while k > 8:
        h = k // 2
        op(src[:h], src[h : 2 * h], out=scratch[:h])
        if k & 1:
            op(scratch[0], src[2 * h], out=scratch[0])
        src, k = scratch, h
    op(out, op.reduce(src[:k], axis=0), out=out)


def _stripe_sums(x: torch.Tensor, shift: torch.Tensor, rows: int, minmax: bool) -> Sums:
    """Column sums, Gram matrix and min/max of one stripe, block by block (see module doc)."""
    n, c = x.shape
    rows = max(1, min(rows, n))
    buf = torch.empty(rows, c, dtype=torch.float64)
    b_all = buf.numpy()
    ones = np.ones(rows)
    gram = np.zeros((c, c))
    ysum = np.zeros(c)
    step = max(1, _CONVERT_ELEMENTS // c)
    xn = x.numpy() if minmax else None
    lo = hi = scratch = None
    if xn is not None:
        lo = np.full(c, np.inf, dtype=xn.dtype)
        hi = np.full(c, -np.inf, dtype=xn.dtype)
        scratch = np.empty((rows // 2 + 1, c), dtype=xn.dtype)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        for s in range(0, k, step):  # convert + shift: one vectorized pass in cache
            e = min(k, s + step)
            torch.sub(x[start + s : start + e], shift, out=buf[s:e])
        b = b_all[:k]
        gram += b.T @ b  # NumPy calls BLAS ?syrk for a.T @ a on one buffer
        ysum += ones[:k] @ b
        if xn is not None and lo is not None and hi is not None and scratch is not None:
            xb = xn[start : start + k]
            _fold_extreme(np.minimum, xb, scratch, lo)
            _fold_extreme(np.maximum, xb, scratch, hi)
    return (ysum, gram,
            None if lo is None else lo.astype(np.float64),
            None if hi is None else hi.astype(np.float64))


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
    x = x.detach().contiguous()
    shift = shift.detach().to(torch.float64).contiguous()
    rows = rows or block_rows(c, x.element_size())
    w = max(1, min(workers or worker_count(), n // MIN_STRIPE_ROWS))
    if w == 1:
        return _stripe_sums(x, shift, rows, track_minmax)
    # Stripes on block boundaries, so the blocks are the same whatever the worker count; a few
    # stripes per worker, pulled from the pool's queue, so that a worker whose core is shared
    # with another process takes fewer of them instead of holding the whole batch back.
    blocks = -(-n // rows)
    tasks = min(blocks, w * STRIPES_PER_WORKER)
    bounds = [min(n, (blocks * i // tasks) * rows) for i in range(tasks + 1)]
    with single_threaded_blas():
        parts = list(pool(w).map(
            lambda i: _stripe_sums(x[bounds[i] : bounds[i + 1]], shift, rows, track_minmax),
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
