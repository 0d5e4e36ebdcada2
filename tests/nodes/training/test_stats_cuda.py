"""The fused Triton moment kernel (nodes/training/stats_cuda.py) equals float64 arithmetic.

Runs on CUDA where there is a GPU; elsewhere, where Triton is installed, the same cases run under
Triton's interpreter (``TRITON_INTERPRET=1``) in a child pytest, since the interpreter must be
chosen before the kernel is defined; without Triton the module is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nodes.training.stats import MomentAccumulator, MomentState

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_device = pytest.mark.skipif(DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
TOL = 1e-12
F64 = torch.float64


def _data(n: int, c: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g, dtype=F64)
    x = torch.randn(n, c, generator=g, dtype=F64) @ mix + 100.0
    return x.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest reference entry (absolute where that is 0)."""
    scale = float(b.cpu().abs().max())
    return float((a.cpu() - b.cpu()).abs().max()) / (scale if scale > 0 else 1.0)


def _check(x: torch.Tensor, **kw: Any) -> None:
    """moment_sums of ``x`` (on DEVICE) against float64 torch on the CPU."""
    from nodes.training import stats_cuda

    xc = x.cpu().to(F64)
    shift = xc[: min(len(xc), 64)].mean(0) + 0.25  # off the mean: no all-zero case
    ysum, gram, lo, hi = stats_cuda.moment_sums(x.to(DEVICE), shift.to(DEVICE), **kw)
    y = xc - shift
    assert gram.dtype == F64 and gram.shape == (x.shape[1], x.shape[1])
    assert _rel(gram, y.T @ y) <= TOL
    assert _rel(ysum, y.sum(0)) <= 1e-9  # sums of centred values: compared to their own size
    assert lo is not None and hi is not None
    assert torch.equal(lo.cpu(), xc.amin(0)) and torch.equal(hi.cpu(), xc.amax(0))


@needs_device
@pytest.mark.parametrize(("n", "c", "programs", "block_n"), [
    (1000, 61, 3, 64),   # the target width: one 64-wide block, masked to 61
    (77, 5, 2, 16),      # ragged last tile
    (300, 70, 2, 32),    # two channel blocks (Gram in 2 x 2 blocks)
    (40, 1, 1, 16),      # one channel
    (1, 3, 1, 16),       # one sample
    (130, 64, 3, 32),    # no spare column for the ones: sums reduced separately
    (100, 16, 2, 16),    # likewise, the smallest block
])
@pytest.mark.parametrize("prefetch", [True, False])
def test_sums_equal_float64(n: int, c: int, programs: int, block_n: int, prefetch: bool) -> None:
    _check(_data(n, c), num_programs=programs, block_n=block_n, prefetch=prefetch)


@needs_device
def test_default_launch_and_many_programs() -> None:
    _check(_data(5000 if INTERPRET else 300_000, 61))


@needs_device
def test_float64_input() -> None:
    _check(_data(500, 12, dtype=F64), num_programs=2, block_n=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_take_the_torch_path(dtype: torch.dtype) -> None:
    from nodes.training import stats_cuda

    assert not stats_cuda.supports(torch.zeros(4, 3, dtype=dtype))
    if torch.cuda.is_available():
        x = _data(5000, 12, dtype=dtype)
        fused, torch_path = MomentAccumulator(12), MomentAccumulator(12, fused=False)
        fused.update(x.cuda())
        torch_path.update(x.cuda())
        assert torch.equal(fused.finalize().m2, torch_path.finalize().m2)


@needs_device
def test_strided_input() -> None:
    wide = _data(400, 40)
    _check(wide[:, ::2], num_programs=2, block_n=32)  # column stride 2
    _check(_data(33, 400).T, num_programs=2, block_n=16)  # column-major (400, 33)


@needs_device
def test_nan_reaches_min_max_and_untracked_minmax() -> None:
    from nodes.training import stats_cuda

    x = _data(200, 6)
    x[17, 2] = float("nan")
    shift = torch.zeros(6, dtype=F64)
    ysum, _gram, lo, hi = stats_cuda.moment_sums(x.to(DEVICE), shift.to(DEVICE),
                                                  num_programs=3, block_n=16)
    assert lo is not None and hi is not None
    assert bool(lo[2].isnan()) and bool(hi[2].isnan()) and bool(ysum[2].isnan())
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(lo.cpu()[keep], x.double().amin(0)[keep])
    *_, lo2, hi2 = stats_cuda.moment_sums(x.to(DEVICE), shift.to(DEVICE), track_minmax=False)
    assert lo2 is None and hi2 is None


@needs_device
@pytest.mark.parametrize(("c", "programs"), [(61, 3), (70, 2), (16, 2)])
def test_fold_equals_the_float64_merge(c: int, programs: int) -> None:
    from nodes.training import stats_cuda

    a, b = _data(300, c, seed=1), _data(257, c, seed=2) * 1.5 - 7.0
    if c == 16:
        b = b[:1]  # a batch of one row
    ref = MomentAccumulator(c)
    ref.update(a.double())
    start = ref.finalize()
    ref.update(b.double())
    want = ref.finalize()
    for st, shift in ((start, start.mean), (MomentState.empty(c), b[:64].double().mean(0))):
        got = MomentState(*stats_cuda.fold(
            st.to(DEVICE or "cpu")._tensors(),
            b.to(DEVICE), shift.to(DEVICE), num_programs=programs, block_n=32)).to("cpu")
        exp = want if st is start else MomentState.from_samples(b.double())
        assert got.count == exp.count
        assert _rel(got.m2, exp.m2) <= TOL and _rel(got.mean, exp.mean) <= TOL
        assert torch.equal(got.min, exp.min) and torch.equal(got.max, exp.max)
        assert torch.equal(got.m2, got.m2.T)
    kept = MomentState(*stats_cuda.fold(
        start.to(DEVICE or "cpu")._tensors(),
        b.to(DEVICE), start.mean.to(DEVICE), track_minmax=False, num_programs=programs,
        block_n=32)).to("cpu")
    assert torch.equal(kept.min, start.min) and torch.equal(kept.max, start.max)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("c", [61, 205])
def test_accumulator_fused_equals_cpu_float64(c: int) -> None:
    batches = [_data(n, c, seed=i) * (1 + i) for i, n in enumerate((70_000, 1, 123_457))]
    cpu, fused = MomentAccumulator(c), MomentAccumulator(c)
    for b in batches:
        cpu.update(b)
        fused.update(b.cuda())
    a, f = cpu.finalize(), fused.finalize().to("cpu")
    assert f.count == a.count
    assert _rel(f.m2, a.m2) <= TOL and _rel(f.mean, a.mean) <= TOL
    assert torch.equal(f.min, a.min) and torch.equal(f.max, a.max)
    ref = MomentState.from_samples(torch.cat(batches))
    assert _rel(f.m2, ref.m2) <= TOL


@pytest.mark.skipif(DEVICE is not None, reason="runs the cases directly here")
def test_cases_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
