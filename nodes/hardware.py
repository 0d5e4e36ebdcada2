"""What the CPU this process runs on offers: cache sizes, cores, a worker pool, BLAS caps, scratch.

Read at run time, so that block sizes and thread counts follow the machine instead of one
machine's constants. Used by the blocked Phase-1 sums (:mod:`nodes.training.stats_blocked`) and
RX scoring on the CPU (:mod:`nodes.library.rx`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

#: Cache sizes assumed per level where neither sysfs nor sysconf reports one (bytes).
FALLBACK_CACHE_BYTES = {1: 32 << 10, 2: 512 << 10, 3: 8 << 20}

_SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def _parse_size(text: str) -> int | None:
    """Bytes of a sysfs cache size such as ``"1024K"`` or ``"32M"``; None where unparseable."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() else None


@functools.cache
def cache_size(level: int = 2, root: Path = _SYSFS_CACHE) -> int:
    """Size in bytes of the data (or unified) cache of ``level`` of the first CPU.

    Read from ``/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}``; where that is
    missing (some containers and non-Linux systems), from ``os.sysconf`` (glibc reads CPUID);
    else :data:`FALLBACK_CACHE_BYTES`.

    Args:
        level: Cache level (1, 2 or 3).
        root: The sysfs cache directory (a parameter for tests).

    Returns:
        The size in bytes (positive).
    """
    try:
        for index in sorted(root.glob("index*")):
            if int((index / "level").read_text()) != level:
                continue
            if (index / "type").read_text().strip() not in ("Data", "Unified"):
                continue
            size = _parse_size((index / "size").read_text())
            if size:
                return size
    except (OSError, ValueError):
        pass
    name = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE",
            3: "SC_LEVEL3_CACHE_SIZE"}.get(level)
    if name is not None and name in os.sysconf_names:
        try:
            size = int(os.sysconf(name))
        except (OSError, ValueError):
            size = 0
        if size > 0:
            return size
    return FALLBACK_CACHE_BYTES.get(level, FALLBACK_CACHE_BYTES[2])


def rows_in_cache(bytes_per_row: int, l2_share: float, min_rows: int,
                  l2_bytes: int | None = None) -> int:
    """Block size of the blocked CPU loops: rows of ``bytes_per_row`` in ``l2_share`` of L2.

    A multiple of 64, at least ``min_rows``.

    Args:
        bytes_per_row: Bytes one row takes in the block's buffers.
        l2_share: Share of L2 (may exceed 1).
        min_rows: Fewest rows.
        l2_bytes: L2 size; default :func:`cache_size` of level 2.
    """
    l2 = cache_size(2) if l2_bytes is None else l2_bytes
    rows = int(l2 * l2_share) // max(1, bytes_per_row)
    return max(min_rows, rows // 64 * 64)


@functools.cache
def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU vendor string the kernel reports (``GenuineIntel``, ``AuthenticAMD``...), or ""."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


#: Environment variable that pins the CPU GEMM library (``torch`` or ``numpy``) over the default.
GEMM_KERNEL_ENV = "CUBELINE_GEMM_KERNEL"


@functools.cache
def gemm_kernel() -> str:
    """Whose BLAS runs the CPU paths' block products: ``"torch"`` (MKL) or ``"numpy"`` (OpenBLAS).

    Chosen once per process from what the machine reports, so that a machine always takes the
    same kernel (Phase-1 sums and RX scores are bit-for-bit repeatable on it): torch's MKL on an
    Intel CPU where torch was built with MKL (on a 2-vCPU Xeon MKL's ``dgemm`` was 20 % faster
    for Phase 1's Gram matrix than OpenBLAS's ``dsyrk`` on the same blocks, and its ``sgemm``
    25 % faster for RX whitening), NumPy's OpenBLAS elsewhere (AMD EPYC, where OpenBLAS's
    ``dsyrk`` was the faster one, and builds without MKL). ``CUBELINE_GEMM_KERNEL=torch|numpy``
    pins it.
    """
    pinned = os.environ.get(GEMM_KERNEL_ENV, "").strip().lower()
    if pinned in ("torch", "numpy"):
        return pinned
    import torch

    mkl = torch.backends.mkl.is_available()
    return "torch" if mkl and cpu_vendor() == "GenuineIntel" else "numpy"


def worker_count() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def pool(workers: int) -> ThreadPoolExecutor:
    """The process's worker pool, grown to at least ``workers`` threads."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or workers > _POOL_SIZE:
            old = _POOL
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cubeline-cpu",
                                       initializer=_init_worker)
            _POOL_SIZE = workers
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def _init_worker() -> None:
    """Make a pool thread run torch ops on itself alone: OpenMP capped at one thread, here only.

    torch sets a new thread's OpenMP thread count to its global one on the thread's first op,
    so a torch op (or MKL call) on each of several worker threads would start its own OpenMP
    team, whose idle threads spin on the same cores: on a 2-vCPU Xeon two workers' float64
    GEMMs ran twice as slow as one. ``omp_set_num_threads`` sets the calling thread's own count
    (an OpenMP per-thread setting), so the main thread keeps its parallelism.
    """
    import torch

    torch.zeros(1).add_(1)  # torch's per-thread set-up first, so it cannot undo the cap below
    for lib in _controller().select(user_api="openmp").lib_controllers:
        lib.set_num_threads(1)
    set_local = _mkl_set_num_threads_local()
    if set_local is not None:
        set_local(1)  # MKL_NUM_THREADS would otherwise outrank the OpenMP cap inside MKL
    _WORKER.omp_capped = True


@functools.cache
def _mkl_set_num_threads_local() -> Any:
    """MKL's per-thread thread-count setter as linked into torch, or None where there is none.

    ``MKL_Set_Num_Threads_Local(int)`` is the C entry point of ``mkl_service.h`` (in torch's
    build the lower-case ``mkl_set_num_threads_local`` symbol is the Fortran one, which takes a
    pointer). It overrides ``MKL_NUM_THREADS`` for the calling thread only.
    """
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        try:
            fn = ctypes.CDLL(str(lib_dir / name)).MKL_Set_Num_Threads_Local
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    return None


_WORKER = threading.local()


def worker_omp_capped() -> bool:
    """Whether the calling thread is a pool worker whose OpenMP is capped at one thread."""
    return bool(getattr(_WORKER, "omp_capped", False))


@functools.cache
def _controller() -> ThreadpoolController:
    """One threadpoolctl controller (finding the BLAS libraries costs a scan of the process)."""
    return ThreadpoolController()


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Cap BLAS (OpenBLAS, MKL, BLIS) at one thread while worker threads call it.

    The cap is process-wide: the caller's own thread waits on the workers meanwhile.
    """
    with _controller().limit(limits=1, user_api="blas"):
        yield


_THREAD_SCRATCH = threading.local()


def thread_arrays(key: str, shape: tuple[int, ...], dtype: npt.DTypeLike,
                  count: int = 1) -> list[np.ndarray]:
    """``count`` work arrays of ``shape`` and ``dtype`` from this thread's scratch ``key``.

    The scratch is one byte buffer per thread and key, grown to the largest request and kept,
    so that the blocked CPU loops (Phase-1 sums, RX scoring) neither allocate nor page-fault
    fresh buffers on every call, and threads never share one. Each array starts 64-byte
    aligned. The arrays stay valid until the same thread asks for ``key`` again.

    Args:
        key: Name of the scratch (one per caller, so two callers never alias).
        shape: Shape of each array.
        dtype: NumPy dtype.
        count: Number of arrays.

    Returns:
        The arrays, C-contiguous, contents undefined.
    """
    dt = np.dtype(dtype)
    item = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    step = -(-item // 64) * 64
    pools: dict[str, np.ndarray] = _THREAD_SCRATCH.__dict__.setdefault("pools", {})
    need = step * count + 64
    raw = pools.get(key)
    if raw is None or raw.size < need:
        pools.pop(key, None)  # free the old buffer before allocating the larger one
        raw = np.empty(need, dtype=np.uint8)
        pools[key] = raw
    off = -raw.ctypes.data % 64
    return [raw[off + i * step : off + i * step + item].view(dt).reshape(shape)
            for i in range(count)]
