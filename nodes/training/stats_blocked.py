"""Phase-1 sums on the CPU in one blocked pass: pixel blocks over worker threads.

For a batch ``x`` (N, C) of any float dtype, or several batches summed as one, and a float64
shift ``s`` (C,), :func:`blocked_sums` returns the float64 column sums and Gram matrix of
``y = x - s`` and the per-channel min/max of ``x``, reading ``x`` once. Each batch is cut into
equal blocks of at most :func:`block_rows` pixels (sized from the L2 cache the machine reports
and the Gram kernel), as many as a multiple of the worker threads; the blocks are dealt into a
few stripes per worker, and a worker walks each stripe it takes block by block:

1. it reads the block once with the compiled loop :func:`nodes.kernels.convert_block`:
   it writes the shifted float64 values into the thread's reused block buffer (the batch is
   never materialized in float64), adds them to the stripe's column sums and folds the raw
   values into the stripe's min/max;
2. it adds the block's Gram matrix with the kernel :func:`gram_kernel` picks for the machine
   (:func:`gram_adder`).

Both steps run without the GIL, so the workers run side by side; the loop makes no torch call
that could start an OpenMP team (the pool's workers cap theirs at one thread anyway,
:func:`nodes.hardware.pool`).

Every stripe has its own accumulators; since all use the same shift, the stripes' sums add up
(in stripe order, so the result does not depend on which worker took which) exactly as the
blocks of one worker do, and the caller merges them into its state with the Chan et al.
formula. While workers run, BLAS is capped at one thread per worker
(:func:`nodes.hardware.single_threaded_blas`), so the threads do not oversubscribe the cores.
Cache size and worker count come from :mod:`nodes.hardware`.

A call costs a wake-up of the workers and a merge, about 1 ms on a 2-vCPU Xeon, whatever its
size: a caller with small batches (one frame) sums several per call (:func:`gather_rows`,
:class:`~nodes.training.stats.MomentAccumulator`'s ``gather``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

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


def _stripe_sums(blocks: Sequence[np.ndarray], shift: np.ndarray, rows: int, minmax: bool
                 ) -> Sums:
    """Column sums, Gram matrix and min/max of a stripe of blocks (see module doc).

    Args:
        blocks: Pixel blocks (k, C) of at most ``rows`` rows each, one dtype.
        shift: Float64 reference point (C,).
        rows: Rows of the largest block (the thread's float64 buffer).
        minmax: Return the min and max too.
    """
    c = blocks[0].shape[1]
    (b_all,) = thread_arrays("moments.block", (rows, c), np.float64)
    gram = np.zeros((c, c))
    ysum = np.zeros(c)
    lo = np.full(c, np.inf, dtype=blocks[0].dtype)
    hi = np.full(c, -np.inf, dtype=blocks[0].dtype)
    add_gram = gram_adder(gram, b_all)
    convert = _convert_block()
    for xb in blocks:
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


def gather_rows(channels: int, in_itemsize: int = 4, workers: int | None = None) -> int:
    """Pixels worth one call of :func:`blocked_sums`: fewer are better summed together.

    Each call costs the workers a wake-up, a wait for the slowest and the caller a merge
    (about 1 ms on a 2-vCPU Xeon); with :data:`STRIPES_PER_WORKER` stripes of two blocks per
    worker that stays a few per cent of the call. At most :data:`GATHER_MAX_BYTES` of input.
    """
    w = workers or worker_count()
    rows = 2 * w * STRIPES_PER_WORKER * block_rows(channels, in_itemsize)
    return max(1, min(rows, GATHER_MAX_BYTES // (channels * in_itemsize)))


#: Most input bytes that :func:`gather_rows` lets a caller hold back to sum together.
GATHER_MAX_BYTES = 64 << 20


def _blocks(x: np.ndarray, rows: int, multiple: int) -> list[np.ndarray]:
    """``x`` cut into equal blocks of at most ``rows`` rows, as many as a multiple of ``multiple``.

    Equal blocks, so that no worker waits at the end of a call on one that got a short last
    block (one 256 x 256 frame is 6 blocks of at most 11456 rows at C = 61 here).
    """
    n = x.shape[0]
    need = -(-n // rows)  # blocks of at most ``rows``
    count = -(-need // multiple) * multiple
    size = -(-n // count)
    return [x[i : i + size] for i in range(0, n, size)]


def blocked_sums(x: torch.Tensor | Sequence[torch.Tensor], shift: torch.Tensor, *,
                 track_minmax: bool = True, rows: int | None = None,
                 workers: int | None = None) -> Sums:
    """Float64 ``(sum y, y^T y, min x, max x)`` of ``y = x - shift`` in one blocked pass.

    Args:
        x: Samples (N, C) on the CPU, any float dtype, or several such batches, summed as one
            (each is cut into blocks of its own: no batch is copied to join the others). Each
            is read once, never copied whole (unless not contiguous).
        shift: Float64 reference point (C,) subtracted before the sums.
        track_minmax: Also return the per-channel min and max of ``x`` (else None, None).
        rows: Pixels per block at most; default :func:`block_rows` from the L2 size.
        workers: Threads; default :func:`nodes.hardware.worker_count`, fewer where stripes
            would be small.

    Returns:
        ``(ysum (C,), gram (C, C), lo (C,) or None, hi (C,) or None)``, all float64.
    """
    parts = [t.detach() for t in ([x] if isinstance(x, torch.Tensor) else x)]
    parts = [t for t in parts if t.shape[0]]
    if not parts:
        raise ValueError("blocked_sums needs at least one sample")
    # One dtype for every block: float64 if any batch has it, else float32 (both exact).
    wide = torch.float64 if any(t.dtype == torch.float64 for t in parts) else torch.float32
    arrays = [t.to(wide).contiguous().numpy() for t in parts]
    n = sum(a.shape[0] for a in arrays)
    c = arrays[0].shape[1]
    rows = max(1, rows or block_rows(c, arrays[0].itemsize))
    s = shift.detach().to(torch.float64).contiguous().numpy()
    w = max(1, min(workers or worker_count(), n // MIN_STRIPE_ROWS))
    blocks = [b for a in arrays for b in _blocks(a, rows, w)]
    rows = max(b.shape[0] for b in blocks)
    _convert_block()  # load (or compile) it here, before the workers would all wait for it
    if w == 1:
        return _stripe_sums(blocks, s, rows, track_minmax)
    # A few stripes of whole blocks per worker, pulled one at a time, so that a worker whose
    # core is shared with another process takes fewer of them instead of holding the whole
    # call back. One pool task per worker pulls them (a task per stripe cost the caller up to
    # ~1 ms per call in wake-ups). The stripes are added up in their order, so the result does
    # not depend on which worker took which.
    # As many stripes per worker as divide the blocks evenly (blocks come in multiples of w):
    # a stripe of one block more than the others kept a worker busy while the rest waited.
    # (A batch of fewer rows than blocks may leave an odd count: then plain even stripes.)
    per_worker = next((k for k in range(min(STRIPES_PER_WORKER, len(blocks) // w), 0, -1)
                       if len(blocks) % (w * k) == 0), None)
    tasks = w * per_worker if per_worker else min(len(blocks), w * STRIPES_PER_WORKER)
    stripes = [blocks[len(blocks) * i // tasks : len(blocks) * (i + 1) // tasks]
               for i in range(tasks)]
    order = iter(range(tasks))
    lock = threading.Lock()

    def take_stripes() -> list[tuple[int, Sums]]:
        done: list[tuple[int, Sums]] = []
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return done
            done.append((i, _stripe_sums(stripes[i], s, rows, track_minmax)))

    with single_threaded_blas():
        futures = [pool(w).submit(take_stripes) for _ in range(w)]
        results = sorted((r for f in futures for r in f.result()), key=lambda r: r[0])
    sums = [r[1] for r in results]
    ysum = sums[0][0]
    gram = sums[0][1]
    for p in sums[1:]:
        ysum += p[0]
        gram += p[1]
    if not track_minmax:
        return ysum, gram, None, None
    lo = np.minimum.reduce([p[2] for p in sums if p[2] is not None])
    hi = np.maximum.reduce([p[3] for p in sums if p[3] is not None])
    return ysum, gram, lo, hi
