"""Blocked, threaded Phase-1 sums on the CPU (nodes/training/stats_blocked.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from nodes import hardware
from nodes.training import stats_blocked as sb
from nodes.training.stats import MomentAccumulator, MomentState

REPO = Path(__file__).resolve().parents[3]
SCENES = ("airport-1", "airport-2", "airport-3", "urban-4", "urban-5", "beach-3", "urban-1",
          "urban-2")


def _scene_paths() -> list[Path]:
    out = []
    for name in SCENES:
        for base in (REPO / "data" / "session", REPO / "data" / "extra",
                     REPO.parent / "shared" / "data" / "abu"):
            p = base / f"abu-{name}.mat"
            if p.is_file():
                out.append(p)
                break
    return out


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass float64 mean and centred Gram matrix of the whole data, straight NumPy."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    d = x64 - mean
    return mean, d.T @ d


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check(state: MomentState, x: np.ndarray, tol: float = 1e-12) -> None:
    mean, m2 = _reference(x)
    assert state.count == x.shape[0]
    assert _rel(state.mean.numpy(), mean) <= tol
    assert _rel(state.m2.numpy(), m2) <= tol
    np.testing.assert_array_equal(state.min.numpy(), x.min(axis=0).astype(np.float64))
    np.testing.assert_array_equal(state.max.numpy(), x.max(axis=0).astype(np.float64))


@pytest.mark.parametrize("path", _scene_paths(), ids=lambda p: p.stem)
def test_abu_scene_matches_float64_reference(path: Path) -> None:
    """Bundled and ABU scenes (raw counts, C = 188..207) as float32, streamed in batches."""
    data = scipy.io.loadmat(path)["data"]
    x = np.ascontiguousarray(data.reshape(-1, data.shape[-1]), dtype=np.float32)
    acc = MomentAccumulator(x.shape[1])
    for part in np.array_split(x, 3):  # several updates: shift, Chan merge
        acc.update(torch.from_numpy(part))
    _check(acc.state, x)


def test_threads_and_block_sizes_agree_with_reference() -> None:
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(61, 61)).astype(np.float32)
    x = (rng.normal(size=(70_001, 61)).astype(np.float32) @ mix + 500.0).astype(np.float32)
    shift = torch.from_numpy(x[:100].astype(np.float64).mean(axis=0))
    results = [
        sb.blocked_sums(torch.from_numpy(x), shift, rows=rows, workers=workers)
        for rows, workers in ((None, 1), (None, 2), (333, 3), (4096, 4))
    ]
    y = x.astype(np.float64) - shift.numpy()
    # Column sums of the shifted data nearly cancel: their rounding is bounded by sum |y|.
    scale = np.linalg.norm(np.abs(y).sum(axis=0))
    for ysum, gram, lo, hi in results:
        assert np.linalg.norm(ysum - y.sum(axis=0)) <= 1e-12 * scale
        assert _rel(gram, y.T @ y) <= 1e-12
        assert lo is not None and hi is not None
        np.testing.assert_array_equal(lo, x.min(axis=0))
        np.testing.assert_array_equal(hi, x.max(axis=0))
    assert sb.blocked_sums(torch.from_numpy(x), shift, track_minmax=False)[2:] == (None, None)
    head = x[:999]
    ysum, gram, lo, hi = sb.blocked_sums(torch.from_numpy(head), shift, rows=1, workers=1)
    assert _rel(gram, y[:999].T @ y[:999]) <= 1e-12
    assert lo is not None
    np.testing.assert_array_equal(lo, head.min(axis=0))


def test_accumulator_matches_reference_on_large_batch_float64_input() -> None:
    """A batch large enough for several worker stripes; float64 input takes the same path."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3 * sb.MIN_STRIPE_ROWS + 17, 9)) * 3.0 + 1e4
    acc = MomentAccumulator(9)
    acc.update(torch.from_numpy(x))
    acc.update(torch.from_numpy(x[:1000] + 1.0))
    _check(acc.state, np.concatenate([x, x[:1000] + 1.0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_kernel_converts_sums_and_folds_extremes(dtype: type) -> None:
    from nodes.kernels import convert_block

    rng = np.random.default_rng(0)
    shift = rng.normal(size=5)
    ysum = np.zeros(5)
    lo: np.ndarray = np.full(5, np.inf, dtype=dtype)
    hi: np.ndarray = np.full(5, -np.inf, dtype=dtype)
    seen: list[np.ndarray] = []
    for n in (1, 2, 7, 64, 1001):
        x: np.ndarray = (rng.normal(size=(n, 5)) * n).astype(dtype)
        out = np.full((n, 5), np.nan)
        convert_block(x, shift, out, ysum, lo, hi)
        np.testing.assert_array_equal(out, x.astype(np.float64) - shift)
        seen.append(x)
    allx = np.concatenate(seen)
    np.testing.assert_allclose(ysum, (allx.astype(np.float64) - shift).sum(axis=0), rtol=1e-13)
    np.testing.assert_array_equal(lo, allx.min(axis=0))
    np.testing.assert_array_equal(hi, allx.max(axis=0))
    # A NaN in a channel stays in that channel's min and max, as np.minimum / np.maximum keep it.
    bad: np.ndarray = np.ones((3, 5), dtype=dtype)
    bad[1, 2] = np.nan
    convert_block(bad, shift, np.empty((3, 5)), ysum, lo, hi)
    convert_block(bad[:1], shift, np.empty((1, 5)), ysum, lo, hi)
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    assert not np.isnan(np.delete(lo, 2)).any() and not np.isnan(np.delete(hi, 2)).any()


def test_bfloat16_and_float16_input_match_their_float32_values() -> None:
    rng = np.random.default_rng(2)
    x32 = (rng.normal(size=(40_000, 7)) * 4 + 50).astype(np.float32)
    shift = torch.full((7,), 50.0, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.from_numpy(x32).to(dtype)
        ref = sb.blocked_sums(x.float(), shift, workers=1)
        for workers in (1, 2):
            got = sb.blocked_sums(x, shift, workers=workers)
            for a, b in zip(got, ref, strict=True):
                assert a is not None and b is not None
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)


def test_cache_size_from_sysfs(tmp_path: Path) -> None:
    for i, (level, kind, size) in enumerate(
        ((1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
         (3, "Unified", "32M"))):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert hardware.cache_size(2, root=tmp_path) == 2048 << 10
    assert hardware.cache_size(1, root=tmp_path) == 48 << 10
    assert hardware.cache_size(3, root=tmp_path) == 32 << 20
    assert hardware.cache_size(2, root=tmp_path / "absent") > 0  # sysconf or the fallback


def test_block_rows_follow_the_cache() -> None:
    small, large = sb.block_rows(61, l2_bytes=256 << 10), sb.block_rows(61, l2_bytes=2 << 20)
    assert small % 64 == 0 and large % 64 == 0
    assert large > 4 * small
    assert sb.block_rows(205, l2_bytes=1 << 20) < sb.block_rows(61, l2_bytes=1 << 20)
    assert sb.block_rows(61, l2_bytes=1) == sb.MIN_BLOCK_ROWS
    assert hardware.worker_count() >= 1


def test_thread_arrays_are_aligned_kept_and_per_thread() -> None:
    a, b = hardware.thread_arrays("test.scratch", (3, 5), np.float64, count=2)
    assert a.shape == b.shape == (3, 5) and a.dtype == np.float64
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0
    assert not np.shares_memory(a, b)
    (again,) = hardware.thread_arrays("test.scratch", (2, 5), np.float64)
    assert again.ctypes.data == a.ctypes.data  # a smaller request reuses the buffer
    (big,) = hardware.thread_arrays("test.scratch", (1000, 5), np.float32)
    assert big.shape == (1000, 5) and big.ctypes.data % 64 == 0
    with ThreadPoolExecutor(max_workers=1) as ex:
        other = ex.submit(lambda: hardware.thread_arrays("test.scratch", (1000, 5), np.float32)[0]
                          .ctypes.data).result()
    assert other != big.ctypes.data  # another thread has its own scratch


@pytest.mark.parametrize("kernel", ["torch", "numpy"])
def test_both_gram_kernels_match_the_reference(monkeypatch: pytest.MonkeyPatch,
                                               kernel: str) -> None:
    monkeypatch.setenv(hardware.GEMM_KERNEL_ENV, kernel)
    hardware.gemm_kernel.cache_clear()
    try:
        assert sb.gram_kernel() == kernel
        rng = np.random.default_rng(4)
        x = (rng.normal(size=(50_003, 23)) * 2 + 300).astype(np.float32)
        shift = torch.from_numpy(x[:64].astype(np.float64).mean(axis=0))
        y = x.astype(np.float64) - shift.numpy()
        for workers in (1, 2):
            _, gram, lo, hi = sb.blocked_sums(torch.from_numpy(x), shift, workers=workers)
            assert _rel(gram, y.T @ y) <= 1e-12
            assert lo is not None and hi is not None
            np.testing.assert_array_equal(lo, x.min(axis=0))
    finally:
        hardware.gemm_kernel.cache_clear()


def test_gram_kernel_follows_the_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(hardware.GEMM_KERNEL_ENV, raising=False)
    hardware.gemm_kernel.cache_clear()
    try:
        want = ("torch" if torch.backends.mkl.is_available()
                and hardware.cpu_vendor() == "GenuineIntel" else "numpy")
        assert sb.gram_kernel() == want
    finally:
        hardware.gemm_kernel.cache_clear()
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert hardware.cpu_vendor(info) == "AuthenticAMD"
    assert hardware.cpu_vendor(tmp_path / "absent") == ""


def test_pool_workers_run_openmp_on_one_thread_and_the_caller_keeps_its_own() -> None:
    from threadpoolctl import threadpool_info

    def omp_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"]

    before = omp_threads()
    if not before:
        pytest.skip("no OpenMP runtime in this process")
    in_worker = hardware.pool(2).submit(omp_threads).result()
    assert in_worker and all(n == 1 for n in in_worker)
    assert omp_threads() == before
    assert hardware.pool(2).submit(hardware.worker_omp_capped).result()
    assert not hardware.worker_omp_capped()


def test_pool_workers_cap_mkl_even_where_mkl_num_threads_is_set() -> None:
    """MKL_NUM_THREADS outranks OpenMP's count inside MKL: workers cap MKL per thread too."""
    if hardware._mkl_set_num_threads_local() is None:
        pytest.skip("torch has no MKL here")
    code = (
        "import ctypes, torch\n"
        "from pathlib import Path\n"
        "from nodes import hardware\n"
        "lib = ctypes.CDLL(str(Path(torch.__file__).parent / 'lib' / 'libtorch_cpu.so'))\n"
        "get = lib.MKL_Get_Max_Threads\n"
        "get.restype = ctypes.c_int\n"
        "print(get(), hardware.pool(2).submit(get).result())\n"
    )
    env = {**os.environ, "MKL_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=REPO, check=True, timeout=120).stdout.split()
    assert out == ["2", "1"]



def test_several_batches_sum_as_their_concatenation() -> None:
    """A list of batches (mixed dtypes, an empty one) is summed as one, none copied to join."""
    rng = np.random.default_rng(11)
    parts = [(rng.normal(size=(n, 17)) * 5 + 40).astype(np.float32)
             for n in (sb.MIN_STRIPE_ROWS + 3, 0, 9_001, 2 * sb.MIN_STRIPE_ROWS)]
    parts[2] = parts[2].astype(np.float64)
    x = np.concatenate(parts).astype(np.float64)
    shift = torch.from_numpy(x[:50].mean(axis=0))
    y = x - shift.numpy()
    for workers in (1, 2, 3):
        ysum, gram, lo, hi = sb.blocked_sums([torch.from_numpy(p) for p in parts], shift,
                                             workers=workers, rows=4_000)
        assert np.linalg.norm(ysum - y.sum(axis=0)) <= 1e-12 * np.linalg.norm(
            np.abs(y).sum(axis=0))
        assert _rel(gram, y.T @ y) <= 1e-12
        assert lo is not None and hi is not None
        np.testing.assert_array_equal(lo, x.min(axis=0))
        np.testing.assert_array_equal(hi, x.max(axis=0))
    with pytest.raises(ValueError, match="at least one sample"):
        sb.blocked_sums([torch.zeros(0, 17)], shift)


def test_blocks_are_equal_and_a_multiple_of_the_workers() -> None:
    x = np.zeros((65_536, 3), dtype=np.float32)
    blocks = sb._blocks(x, 11_456, 2)
    assert len(blocks) == 6 and sum(len(b) for b in blocks) == 65_536
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 6
    assert len(sb._blocks(x, 11_456, 4)) == 8
    assert all(b.base is x for b in blocks)  # views, not copies


def test_gather_holds_small_batches_and_sums_them_together(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """gather=True: batches under gather_rows wait; reading the state sums them; same state."""
    calls: list[int] = []
    inner = sb.blocked_sums

    def counting(x: torch.Tensor | list[torch.Tensor], *a: object, **k: object) -> sb.Sums:
        calls.append(len(x) if isinstance(x, list) else 1)
        return inner(x, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr("nodes.training.stats.blocked_sums", counting)
    rng = np.random.default_rng(8)
    limit = sb.gather_rows(13)
    parts = [(rng.normal(size=(limit // 3 + 7 * i, 13)) * 4 + 800).astype(np.float32)
             for i in range(7)]
    plain, gathered = MomentAccumulator(13), MomentAccumulator(13, gather=True)
    for part in parts:
        plain.update(torch.from_numpy(part))
    assert calls == [1] * 7
    calls.clear()
    for part in parts:
        gathered.update(torch.from_numpy(part))
    assert calls == [3, 3]  # three batches make one call's worth; one is still held
    _check(gathered.state, np.concatenate(parts))  # reading the state sums the last one
    assert calls == [3, 3, 1]
    for name in ("mean", "m2"):
        a, b = getattr(gathered.state, name).numpy(), getattr(plain.state, name).numpy()
        assert _rel(a, b) <= 1e-13
    gathered.update(torch.from_numpy(parts[0]))
    gathered.reset()  # drops what is held
    assert gathered.state.count == 0


def test_gather_rows_follows_the_workers_and_is_capped() -> None:
    cap = sb.GATHER_MAX_BYTES // (61 * 4)
    one = sb.gather_rows(61, workers=1)
    assert one == min(cap, 2 * sb.STRIPES_PER_WORKER * sb.block_rows(61))
    assert sb.gather_rows(61, workers=2) == min(cap, 2 * one)
    assert sb.gather_rows(61, workers=1024) == cap


def test_tiny_batches_among_large_ones_still_split_over_workers() -> None:
    rng = np.random.default_rng(12)
    parts = [rng.normal(size=(n, 5)).astype(np.float32) for n in (1, 3 * sb.MIN_STRIPE_ROWS, 1)]
    x = np.concatenate(parts).astype(np.float64)
    shift = torch.zeros(5, dtype=torch.float64)
    _, gram, _, _ = sb.blocked_sums([torch.from_numpy(p) for p in parts], shift, workers=2)
    assert _rel(gram, x.T @ x) <= 1e-12
