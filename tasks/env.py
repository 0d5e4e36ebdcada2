"""Process environment for the orchestration layer: telemetry off, repository root, lazy imports.

Every switch below is needed for a run that opens no connection outside loopback (each library
phones home by default). They must be in ``os.environ`` *before* prefect, mlflow or dvc are
imported, because each library reads its settings at import time; the CLI therefore calls
:func:`disable_telemetry` first thing, and ``tasks/__init__.py`` calls it on import.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tasks.watchdog import process_alive as process_alive  # re-exported: one liveness check

#: Values are forced, not defaulted: a user's environment must not turn analytics back on.
TELEMETRY_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "true",  # MLflow accepts only "true", not "1"
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}

#: Defaults a user may override (set only when absent).
DEFAULT_ENV: dict[str, str] = {
    # The temporary Prefect API server takes 15-27 s on a fresh PREFECT_HOME here; the library
    # default of 20 s fails the first run on a slow disk.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # MLflow otherwise warns on every run when git lacks a user, or GitPython cannot find git.
    "GIT_PYTHON_REFRESH": "quiet",
}

ROOT_ENV = "CUBELINE_ROOT"


def disable_telemetry() -> None:
    """Turn off every analytics/telemetry call of Prefect, MLflow and DVC in this process.

    Child processes (Prefect's temporary API server, ``dvc`` subprocesses) inherit the settings.
    """
    os.environ.update(TELEMETRY_ENV)
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


def repo_root(start: Path | None = None) -> Path:
    """Return the cubeline repository root.

    ``$CUBELINE_ROOT`` wins; otherwise the nearest directory at or above ``start`` (default: the
    working directory) holding both ``params.yaml`` and ``data.dvc``; otherwise the checkout this
    module was imported from.

    Args:
        start: Directory to search upwards from.

    Returns:
        The absolute repository root.
    """
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "params.yaml").is_file() and (candidate / "data.dvc").is_file():
            return candidate
    return Path(__file__).resolve().parent.parent


#: glibc ``mallopt`` parameters for local shard workers and the CLI (see :func:`tune_allocator`).
WORKER_MALLOPT: dict[str, tuple[int, int]] = {
    "M_MMAP_THRESHOLD": (-3, 1 << 30),
    "M_TRIM_THRESHOLD": (-1, 2**31 - 1),
}


def tune_allocator() -> dict[str, bool]:
    """Keep frame-sized buffers on this process's heap: serve them from memory already mapped.

    A Phase-1 batch allocates and frees buffers of 16-64 MB (frames, the stacked batch, the
    selected pixels). glibc maps every block above its mmap threshold (32 MB at most by
    default) afresh and unmaps it on free, so each batch faults its pages in again (kernel time
    that ``bench/phase1.py`` shows). With the
    threshold at 1 GiB and heap trimming off, freed blocks are reused; the process keeps its
    peak heap (about one shard's frames) until it exits. Applied to the local Dask workers
    cubeline starts (never to a remote cluster's workers) and to the ``cubeline`` command's own
    process; library callers decide for their processes.

    Returns:
        ``{parameter: accepted}``; all False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return dict.fromkeys(WORKER_MALLOPT, False)
    return {key: bool(mallopt(param, value)) for key, (param, value) in WORKER_MALLOPT.items()}


#: Set by ``cubeline -v``; served and worker runs inherit it through the environment.
VERBOSE_ENV = "CUBELINE_VERBOSE"

#: ``0``: Phase 2 starts over instead of resuming its last epoch (``--no-resume``).
RESUME_ENV = "CUBELINE_RESUME"


def quiet_lightning() -> None:
    """Lightning's start-up notices (accelerators, tips) off unless ``cubeline -v``.

    Lightning sets its loggers to INFO when imported, so call this after importing it. Flow runs
    that a served deployment or a worker starts in a new process call it too (through the
    Phase-2 step), so their terminal shows cubeline's outcome line, not library chatter.
    """
    import logging

    level = logging.INFO if os.environ.get(VERBOSE_ENV) else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(level)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers never see a half-written file, and an existing link at ``path`` is replaced, never
    followed (a symlink planted in an output folder cannot redirect the write).
    """
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def cpu_model() -> str:
    """The CPU model as the machine reports it (``/proc/cpuinfo``), for benchmark records."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: Prefect result storage of a repository; cubeline's own Phase-1 step cache is under ``steps/``.
RESULTS_DIR = Path(".prefect") / "results"


def results_dir(root: Path) -> Path:
    """Where the step cache of the repository at ``root`` lives (ignored by git)."""
    return (Path(root) / RESULTS_DIR).resolve()
