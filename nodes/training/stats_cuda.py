"""Fused CUDA moment sums: one Triton kernel reads each sample once.

:class:`~nodes.training.stats.MomentAccumulator` needs, per batch, the Gram matrix ``Y^T Y`` and the
column sums of ``Y = X - shift`` in float64, and the per-channel min/max of ``X``. The plain torch
path writes a shifted float64 copy of ``X`` and runs a GEMM, a sum and an ``aminmax`` over it
(several passes through memory). Here one kernel does all of it: every program streams a
contiguous range of rows, converts each tile to float64 in registers, subtracts the shift and
adds ``tile^T tile`` (a float64 ``tl.dot``), the column sums and the min/max into its own
partials; torch then reduces the partials over the programs in float64, in a fixed order, so the
result is deterministic and is float64 arithmetic throughout, like the CPU path.

Channels are padded to a power of two (at least 16) with masks; above 64 channels the Gram
matrix is split into 64 x 64 blocks, one grid axis each.

This module imports Triton at import time; :mod:`nodes.training.stats` imports it lazily, only for
CUDA
inputs, and falls back to the torch path where Triton is missing.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_F64 = torch.float64

#: Input dtypes the kernel reads (converted to float64 in registers); others take the torch path.
SUPPORTED_DTYPES = (torch.float32, torch.float64)

#: Largest channel block of one program's Gram accumulator (64 x 64 float64 in registers).
MAX_BLOCK_C = 64

#: Launch defaults, chosen by a sweep on an H100 (bench/phase1_gpu.py --sweep).
DEFAULT_BLOCK_N = 16
DEFAULT_NUM_WARPS = 2
DEFAULT_PROGRAMS_PER_SM = 4
DEFAULT_PREFETCH = True


@triton.jit
def _load_tile(x_ptr, row0, t, n_rows, stride_row, col_off, c_ok, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
    """Tile ``t`` (BLOCK_N rows from ``row0 + t * BLOCK_N``) of the columns ``col_off``."""
    rows = row0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < n_rows)[:, None] & c_ok[None, :]
    return tl.load(x_ptr + (rows * stride_row)[:, None] + col_off[None, :], mask=m, other=0.0)


@triton.jit
def _shifted(x, row0, t, n_rows, cols, n_cols, shift, ONES: tl.constexpr, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
    """``x - shift`` in float64, zero outside the data; with ``ONES``, 1 in column ``n_cols``."""
    rows = row0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = (rows < n_rows)[:, None]
    y = tl.where(r_ok & (cols < n_cols)[None, :], x.to(tl.float64) - shift[None, :], 0.0)
    if ONES:
        y = tl.where(r_ok & (cols == n_cols)[None, :], 1.0, y)
    return y


@triton.jit
def _moment_sums_kernel(  # type: ignore[no-untyped-def]
    x_ptr, shift_ptr, gram_ptr, sum_ptr, mm_ptr,
    n_rows, n_cols, stride_row, stride_col,
    TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CP: tl.constexpr,  # noqa: N803
    ONE_BLOCK: tl.constexpr, ONES: tl.constexpr, TRACK_MINMAX: tl.constexpr,  # noqa: N803
    PREFETCH: tl.constexpr,  # noqa: N803
):
    """Partial sums of one row range (axis 0) and one Gram block (axes 1, 2).

    Writes ``gram[pid, i-block, j-block] = sum y_i y_j`` of ``y = x - shift``. With ``ONES``
    (fewer channels than ``CP``) ``y`` carries a column of ones at index ``n_cols``, so the Gram
    matrix holds the column sums too; otherwise the diagonal blocks' programs write them to
    ``sum``. The diagonal blocks' programs write the min and the negated max of ``x`` (NaN if
    any) to ``mm[pid, 0]`` and ``mm[pid, 1]`` (one ``amin`` then reduces both), reduced once at
    the end from elementwise running tiles.
    """
    pid = tl.program_id(0)
    bi = tl.program_id(1)
    bj = tl.program_id(2)
    cols_i = bi * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_j = bj * BLOCK_C + tl.arange(0, BLOCK_C)
    ci_ok = cols_i < n_cols
    cj_ok = cols_j < n_cols
    shift_i = tl.load(shift_ptr + cols_i, mask=ci_ok, other=0.0)
    shift_j = tl.load(shift_ptr + cols_j, mask=cj_ok, other=0.0)
    off_i = cols_i.to(tl.int64) * stride_col
    off_j = cols_j.to(tl.int64) * stride_col

    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float64)
    col_sum = tl.zeros((BLOCK_C,), dtype=tl.float64)
    xdt = x_ptr.dtype.element_ty
    lo_t = tl.full((BLOCK_N, BLOCK_C), float("inf"), dtype=xdt)
    hi_t = tl.full((BLOCK_N, BLOCK_C), float("-inf"), dtype=xdt)

    row0 = pid.to(tl.int64) * (TILES * BLOCK_N)
    row_end = tl.minimum(row0 + TILES * BLOCK_N, n_rows)
    if PREFETCH:
        x_next = _load_tile(x_ptr, row0, 0, row_end, stride_row, off_i, ci_ok, BLOCK_N)
    for t in range(TILES):
        if PREFETCH:
            xi = x_next
            x_next = _load_tile(x_ptr, row0, t + 1, row_end, stride_row, off_i, ci_ok, BLOCK_N)
        else:
            xi = _load_tile(x_ptr, row0, t, row_end, stride_row, off_i, ci_ok, BLOCK_N)
        if TRACK_MINMAX:
            rows = row0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
            m_i = (rows < row_end)[:, None] & ci_ok[None, :]
            lo_t = tl.where(m_i, tl.minimum(lo_t, xi, propagate_nan=tl.PropagateNan.ALL), lo_t)
            hi_t = tl.where(m_i, tl.maximum(hi_t, xi, propagate_nan=tl.PropagateNan.ALL), hi_t)
        yi = _shifted(xi, row0, t, row_end, cols_i, n_cols, shift_i, ONES, BLOCK_N)
        if ONE_BLOCK:
            yj = yi
        else:
            xj = _load_tile(x_ptr, row0, t, row_end, stride_row, off_j, cj_ok, BLOCK_N)
            yj = _shifted(xj, row0, t, row_end, cols_j, n_cols, shift_j, ONES, BLOCK_N)
        acc = tl.dot(tl.trans(yi), yj, acc, input_precision="ieee", out_dtype=tl.float64)
        if not ONES:
            col_sum += tl.sum(yi, axis=0)

    g_off = pid.to(tl.int64) * CP * CP
    tl.store(gram_ptr + g_off + cols_i[:, None] * CP + cols_j[None, :], acc)
    if bi == bj:
        if not ONES:
            tl.store(sum_ptr + pid.to(tl.int64) * CP + cols_i, col_sum)
        if TRACK_MINMAX:
            nan = tl.max((lo_t != lo_t).to(tl.int32), axis=0) > 0
            lo = tl.min(lo_t, axis=0).to(tl.float64)
            neg_hi = -tl.max(hi_t, axis=0).to(tl.float64)
            mm_off = pid.to(tl.int64) * 2 * CP + cols_i
            tl.store(mm_ptr + mm_off, tl.where(nan, float("nan"), lo))
            tl.store(mm_ptr + mm_off + CP, tl.where(nan, float("nan"), neg_hi))


@triton.jit(do_not_specialize=["n_b_int"])  # (a batch of one row would make it a constant)
def _fold_kernel(  # type: ignore[no-untyped-def]
    full_ptr, sum_ptr, mm_ptr, shift_ptr,
    n_a_ptr, mean_a_ptr, m2_a_ptr, min_a_ptr, max_a_ptr,
    n_ptr, mean_ptr, m2_ptr, min_ptr, max_ptr,
    n_b_int, n_cols,
    BLOCK_C: tl.constexpr, CP: tl.constexpr, TRACK_MINMAX: tl.constexpr,  # noqa: N803
):
    """Merge a batch's reduced sums into a state ``(n, mean, M2, min, max)``, one block each.

    The batch: ``ybar = sum y / n_b``, ``mean_b = shift + ybar``, ``M2_b = G - n_b ybar ybar^T``
    (``G`` symmetrized); then the merge of Chan et al.: ``delta = mean_b - mean_a``,
    ``w = n_b / n``, ``mean = mean_a + w delta``, ``M2 = M2_a + M2_b + n_a w delta delta^T``.
    """
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    ci = bi * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = bj * BLOCK_C + tl.arange(0, BLOCK_C)
    ci_ok = ci < n_cols
    cj_ok = cj < n_cols
    ys_i = tl.load(sum_ptr + ci, mask=ci_ok, other=0.0)
    ys_j = tl.load(sum_ptr + cj, mask=cj_ok, other=0.0)
    n_b = n_b_int.to(tl.float64)
    n_a = tl.load(n_a_ptr)
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    ybar_i = ys_i / n_b
    ybar_j = ys_j / n_b
    mean_a_i = tl.load(mean_a_ptr + ci, mask=ci_ok, other=0.0)
    d_i = tl.load(shift_ptr + ci, mask=ci_ok, other=0.0) + ybar_i - mean_a_i
    d_j = (tl.load(shift_ptr + cj, mask=cj_ok, other=0.0) + ybar_j
           - tl.load(mean_a_ptr + cj, mask=cj_ok, other=0.0))
    m = ci_ok[:, None] & cj_ok[None, :]
    g = tl.load(full_ptr + ci[:, None] * CP + cj[None, :], mask=m, other=0.0)
    g_t = tl.load(full_ptr + cj[None, :] * CP + ci[:, None], mask=m, other=0.0)
    m2_b = (g + g_t) * 0.5 - ybar_i[:, None] * ybar_j[None, :] * n_b
    off = ci[:, None] * n_cols + cj[None, :]
    m2 = tl.load(m2_a_ptr + off, mask=m, other=0.0) + m2_b + d_i[:, None] * d_j[None, :] * (n_a * w)
    tl.store(m2_ptr + off, m2, mask=m)
    if bi == bj:
        tl.store(mean_ptr + ci, mean_a_i + d_i * w, mask=ci_ok)
        lo = tl.load(min_a_ptr + ci, mask=ci_ok, other=0.0)
        hi = tl.load(max_a_ptr + ci, mask=ci_ok, other=0.0)
        if TRACK_MINMAX:
            lo = tl.minimum(lo, tl.load(mm_ptr + ci, mask=ci_ok, other=0.0),
                            propagate_nan=tl.PropagateNan.ALL)
            hi = tl.maximum(hi, -tl.load(mm_ptr + CP + ci, mask=ci_ok, other=0.0),
                            propagate_nan=tl.PropagateNan.ALL)
        tl.store(min_ptr + ci, lo, mask=ci_ok)
        tl.store(max_ptr + ci, hi, mask=ci_ok)
        if bi == 0:
            tl.store(n_ptr, n)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _round_tiles(t: int) -> int:
    """Round a tile count up to three significant bits.

    The count is a compile-time loop bound: few variants compile, and the grid stays within
    12.5 % of the programs asked for.
    """
    step = max(1, _next_pow2(t) // 8)
    return -(-t // step) * step


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def supports(x: Tensor) -> bool:
    """Whether :func:`moment_sums` takes ``x`` (a 2-d CUDA tensor of a supported float dtype)."""
    return x.is_cuda and x.ndim == 2 and x.dtype in SUPPORTED_DTYPES


class _Sums(NamedTuple):
    """A batch's sums reduced over the kernel's programs (float64, padded to ``cp``)."""

    full: Tensor  # (cp, cp) Gram matrix of y (row ``c`` holds the column sums where ``ones``)
    sums: Tensor  # (cp,) column sums of y (a view of row ``c`` of ``full`` where ``ones``)
    mm: Tensor | None  # (2, cp): min and negated max of x
    c: int
    cp: int
    block_c: int
    ones: bool


def _sums(x: Tensor, shift: Tensor, *, track_minmax: bool, block_n: int, num_warps: int,
          programs_per_sm: int, num_programs: int | None, prefetch: bool) -> _Sums:
    n, c = int(x.shape[0]), int(x.shape[1])
    if n == 0:
        raise ValueError("the fused moment kernel needs at least one sample")
    block_c = min(max(16, _next_pow2(c)), MAX_BLOCK_C)
    n_cb = triton.cdiv(c, block_c)
    cp = n_cb * block_c
    if num_programs is None:
        # (On the CPU: Triton's interpreter, in tests.)
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 4
        num_programs = max(1, sms * programs_per_sm // (n_cb * n_cb))
    tiles = _round_tiles(triton.cdiv(triton.cdiv(n, block_n), max(1, num_programs)))
    progs = triton.cdiv(n, tiles * block_n)
    dev = x.device
    ones = c < cp
    gram_part = torch.empty(progs, cp, cp, dtype=_F64, device=dev)
    sum_part = gram_part if ones else torch.empty(progs, cp, dtype=_F64, device=dev)
    mm_part = torch.empty(progs, 2, cp, dtype=_F64, device=dev) if track_minmax else gram_part
    shift = shift.to(device=dev, dtype=_F64).contiguous()
    _moment_sums_kernel[(progs, n_cb, n_cb)](
        x, shift, gram_part, sum_part, mm_part,
        n, c, x.stride(0), x.stride(1),
        TILES=tiles, BLOCK_N=block_n, BLOCK_C=block_c, CP=cp, ONE_BLOCK=n_cb == 1, ONES=ones,
        TRACK_MINMAX=track_minmax, PREFETCH=prefetch, num_warps=num_warps,
    )
    # Fixed-order reductions over the programs (deterministic); amin propagates NaN.
    full = gram_part.sum(dim=0)
    return _Sums(full=full, sums=full[c] if ones else sum_part.sum(dim=0),
                 mm=mm_part.amin(dim=0) if track_minmax else None,
                 c=c, cp=cp, block_c=block_c, ones=ones)


def moment_sums(
    x: Tensor,
    shift: Tensor,
    *,
    track_minmax: bool = True,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = DEFAULT_NUM_WARPS,
    programs_per_sm: int = DEFAULT_PROGRAMS_PER_SM,
    num_programs: int | None = None,
    prefetch: bool = DEFAULT_PREFETCH,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Column sums, Gram matrix and min/max of ``x - shift`` in float64, in one pass.

    Args:
        x: Samples (N, C), N > 0, of a dtype in :data:`SUPPORTED_DTYPES`; any strides.
        shift: Float64 reference point (C,) on the same device.
        track_minmax: Also return the per-channel min/max of ``x`` (as float64).
        block_n: Rows per tile (a power of two, at least 16).
        num_warps: Warps per program.
        programs_per_sm: Row ranges per multiprocessor (ignored if ``num_programs`` is given).
        num_programs: Exact number of row ranges (mostly for tests).
        prefetch: Load the next tile before working on this one (software pipelining).

    Returns:
        ``(ysum, gram, lo, hi)``: sums (C,) and Gram matrix (C, C) of ``x - shift`` and, if
        tracked, min and max (C,) of ``x`` (NaN for a channel holding a NaN); all float64.
    """
    r = _sums(x, shift, track_minmax=track_minmax, block_n=block_n, num_warps=num_warps,
              programs_per_sm=programs_per_sm, num_programs=num_programs, prefetch=prefetch)
    c = r.c
    ysum = r.sums[:c]
    if r.mm is None:
        return ysum, r.full[:c, :c], None, None
    return ysum, r.full[:c, :c], r.mm[0, :c], -r.mm[1, :c]


def fold(
    state: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    x: Tensor,
    shift: Tensor,
    *,
    track_minmax: bool = True,
    **launch: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Merge the samples ``x`` into a moment state: two Triton kernels and two reductions.

    Args:
        state: ``(n, mean, M2, min, max)`` float64 tensors on ``x``'s device (not modified).
        x: Samples (N, C), N > 0 (see :func:`moment_sums`).
        shift: Float64 reference point (C,) near the mean (e.g. the state's mean).
        track_minmax: Fold the batch's min/max in (else the state's stay).
        **launch: Launch settings passed to :func:`moment_sums` (``block_n``, ...).

    Returns:
        The new ``(n, mean, M2, min, max)`` (new tensors).
    """
    opts: dict[str, Any] = {"block_n": DEFAULT_BLOCK_N, "num_warps": DEFAULT_NUM_WARPS,
                            "programs_per_sm": DEFAULT_PROGRAMS_PER_SM, "num_programs": None,
                            "prefetch": DEFAULT_PREFETCH, **launch}
    r = _sums(x, shift, track_minmax=track_minmax, **opts)
    n_a, mean_a, m2_a, min_a, max_a = state
    c, dev = r.c, x.device
    out = (torch.empty((), dtype=_F64, device=dev), torch.empty(c, dtype=_F64, device=dev),
           torch.empty(c, c, dtype=_F64, device=dev), torch.empty(c, dtype=_F64, device=dev),
           torch.empty(c, dtype=_F64, device=dev))
    n_cb = r.cp // r.block_c
    _fold_kernel[(n_cb, n_cb)](
        r.full, r.sums, r.full if r.mm is None else r.mm,
        shift.to(device=dev, dtype=_F64).contiguous(),
        n_a, mean_a.contiguous(), m2_a.contiguous(), min_a.contiguous(), max_a.contiguous(),
        *out, int(x.shape[0]), c,
        BLOCK_C=r.block_c, CP=r.cp, TRACK_MINMAX=r.mm is not None,
    )
    return out
