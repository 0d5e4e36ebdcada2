"""The MLflow store: set-up, reachability, experiments, and cross-process locks keyed on its URI.

:func:`configure_mlflow` points MLflow at an absolute SQLite store and artifact root (MLflow's
own defaults are relative to the working directory) and fails fast on an unreachable server.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from nodes.errors import CubelineError

if TYPE_CHECKING:
    from filelock import BaseFileLock



_log = logging.getLogger(__name__)


DEFAULT_EXPERIMENT = "cubeline"


#: The team's tracking store when params.yaml leaves ``mlflow.tracking_uri`` null.
TRACKING_URI_ENV = "CUBELINE_MLFLOW_TRACKING_URI"


#: Seconds to wait for an HTTP tracking server before giving up. MLflow's own client retries for
#: minutes (exponential back-off over 7 retries) before reporting a dead server.
_PROBE_TIMEOUT_S = 2.5


class TrackingUnavailableError(CubelineError):
    """The MLflow tracking server (or store) cannot be reached or opened."""


class LockTimeoutError(CubelineError):
    """A cross-process lock on a tracking/registry store was not obtained in time."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


_locks: dict[str, BaseFileLock] = {}


_locks_guard = threading.Lock()


def _normalized_uri(uri: str) -> str:
    db = _sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri.rstrip("/")


def lock_path(uri: str, purpose: str) -> Path:
    """Lock file for ``purpose`` on the store at ``uri`` (in the temp dir, not the repo)."""
    key = hashlib.sha256(_normalized_uri(uri).encode()).hexdigest()[:20]
    # Not beside mlflow.db: the repository must stay free of unexpected files.
    lock_dir = Path(tempfile.gettempdir()) / "cubeline-locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    return lock_dir / f"{key}.{purpose}.lock"


@contextlib.contextmanager
def uri_lock(uri: str, purpose: str, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive lock on ``(uri, purpose)`` across processes and threads.

    ``fcntl`` locks through ``filelock``: the kernel releases them when the holder dies, so a
    killed process leaves no stale lock. Re-entrant within a thread (one lock object per path),
    so a rollback hook may take the lock its registration already holds. Host-local: processes
    on other machines sharing a remote store are not excluded.

    Raises:
        LockTimeoutError: Not obtained within ``timeout_s``.
    """
    from filelock import FileLock, Timeout

    path = lock_path(uri, purpose)
    with _locks_guard:
        lock = _locks.setdefault(str(path), FileLock(path))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout as exc:
        raise LockTimeoutError(f"lock {path} not obtained within {timeout_s:.0f} s", path) from exc
    try:
        yield
    finally:
        lock.release()


def _force_telemetry_off() -> None:
    # Forced, not defaulted: MLflow reads these when it starts its telemetry client, and only the
    # exact string "true" counts.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"


def _probe_http(uri: str, timeout: float = _PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailableError` unless an HTTP server answers at ``uri``."""
    parsed = urllib.parse.urlparse(uri)
    host = parsed.hostname
    if not host:
        raise TrackingUnavailableError(
            f"Tracking URI {uri!r} has no host name. Fix: pass a URI such as "
            "'http://127.0.0.1:5000', or leave it unset for the local SQLite store."
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    fix = (
        f"Fix: start the server (e.g. `mlflow server --host {host} --port {port}`), correct the "
        "URI (--tracking-uri / MLFLOW_TRACKING_URI), or leave it unset to use the local SQLite "
        "store mlflow.db at the repository root."
    )
    # A bare TCP connect first: it fails in microseconds on a closed port and within `timeout` on
    # an unroutable host, without urllib's proxy and redirect handling in the way. Both steps
    # share one deadline, so the whole probe stays under ~`timeout` + 0.5 s.
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri!r} is unreachable ({host}:{port}: {exc}). {fix}"
        ) from exc
    health = uri.rstrip("/") + "/health"
    try:
        # Proxies are bypassed on purpose: the probe asks whether *this* URI answers.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(health, timeout=max(0.5, deadline - time.monotonic())):
            pass
    except urllib.error.HTTPError:
        # Something answered HTTP: reachable. Authentication or routing problems surface with
        # MLflow's own message on the first real call.
        return
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri!r} accepted a connection but did not answer "
            f"{health!r} within {timeout:.1f} s ({exc}). {fix}"
        ) from exc


def _sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix) :]
    if rest in ("", ":memory:"):
        return None
    return Path(rest.split("?", 1)[0])


def configure_mlflow(
    tracking_uri: str | None,
    repo_root: Path,
    registry_uri: str | None = None,
    experiment_name: str = DEFAULT_EXPERIMENT,
) -> str:
    """Point this process's MLflow at the tracking store and make the experiment active.

    ``tracking_uri`` (``params.yaml`` ``mlflow.tracking_uri``) wins; unset,
    ``$CUBELINE_MLFLOW_TRACKING_URI`` (what ``cubeline stack up`` exports for a team, and what the
    ``cubeline`` command sets from the ``$MLFLOW_TRACKING_URI`` it was started with: every clone's
    params stay as committed). ``$MLFLOW_TRACKING_URI`` itself is not read here: MLflow rewrites
    it on every ``set_tracking_uri``, so inside one process it names the last store opened, not
    the user's choice.
    Defaults to a SQLite store ``<repo_root>/mlflow.db`` and artifacts under
    ``<repo_root>/mlartifacts``, both absolute so that a flow started from another working
    directory writes to the same place. An ``http(s)://`` URI is probed first and must answer
    within ~3 s; its experiments keep the server's artifact store.

    Args:
        tracking_uri: MLflow tracking URI, or None for ``$CUBELINE_MLFLOW_TRACKING_URI`` else the
            local SQLite default. A relative ``sqlite:///x.db`` is taken relative to ``repo_root``.
        repo_root: Repository root (where ``mlflow.db`` and ``mlartifacts/`` live).
        registry_uri: Model-registry URI; None uses the tracking URI.
        experiment_name: Experiment to create (with the absolute artifact location) or reuse.

    Returns:
        The tracking URI in effect.

    Raises:
        TrackingUnavailableError: The server does not answer, or the store cannot be opened.
    """
    _force_telemetry_off()
    repo_root = Path(repo_root).resolve()
    uri = (
        tracking_uri
        or os.environ.get(TRACKING_URI_ENV)
        or f"sqlite:///{repo_root / 'mlflow.db'}"
    )
    db_path = _sqlite_path(uri)
    if db_path is not None and not db_path.is_absolute():
        db_path = (repo_root / db_path).resolve()
        uri = f"sqlite:///{db_path}"
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
    if registry_uri and registry_uri.startswith(("http://", "https://")) and registry_uri != uri:
        _probe_http(registry_uri)
    if db_path is not None and db_path.exists() and not db_path.is_file():
        raise TrackingUnavailableError(
            f"the MLflow store {db_path} is not a file (a folder or device stands there). Fix: "
            "move it aside, or set mlflow.tracking_uri to another sqlite:///<path>/mlflow.db"
        )
    if db_path is not None:
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailableError(
                f"Cannot create the directory of the MLflow store {uri!r}: {exc}. Fix: choose a "
                "writable location with --tracking-uri sqlite:///<path>/mlflow.db."
            ) from exc

    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri or uri)
    # Local artifacts only beside a local SQLite store: a tracking server serves (or proxies)
    # its own artifact store, which a path on this machine would bypass.
    artifact_root = (repo_root / "mlartifacts").as_uri() if db_path is not None else None
    try:
        # The first client call creates/migrates a fresh SQLite schema; two processes doing it at
        # once fail ("duplicate column"), so store initialization is serialized.
        with uri_lock(uri, "init", timeout_s=120.0):
            _open_experiment(experiment_name, artifact_root, warn=db_path is not None)
        from tasks.tracking.reconcile import reconcile_dead_runs

        # Every command that opens the store closes the runs that dead processes left RUNNING.
        reconcile_dead_runs()
    except (MlflowException, LockTimeoutError) as exc:
        raise TrackingUnavailableError(
            f"Cannot open the MLflow tracking store {uri!r}: {exc}. Fix: check the URI and that "
            "the store is writable, or leave it unset to use <repo>/mlflow.db."
        ) from exc
    return uri


def _open_experiment(experiment_name: str, artifact_root: str | None, warn: bool) -> None:
    """Create the experiment with our artifact root (None: the server's), or reuse it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            client.create_experiment(experiment_name, artifact_location=artifact_root)
        except MlflowException as exc:
            # Two processes creating the experiment at once: the loser reuses the winner's.
            if "already exists" not in str(exc).lower():
                raise
    else:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if artifact_root and experiment.artifact_location != artifact_root and warn:
            # An experiment's artifact location is fixed at creation; say where runs go.
            _log.warning(
                "MLflow experiment %r keeps its artifact location %s (not %s)",
                experiment_name,
                experiment.artifact_location,
                artifact_root,
            )
    exp = mlflow.set_experiment(experiment_name)
    if exp.tags.get(_EXPERIMENT_KIND_TAG) != _EXPERIMENT_KIND:
        # MLflow 3's UI opens experiments of unknown kind on its GenAI (traces) view; this kind
        # makes the experiment page open on the training runs, their charts and models.
        client.set_experiment_tag(exp.experiment_id, _EXPERIMENT_KIND_TAG, _EXPERIMENT_KIND)


_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


_EXPERIMENT_KIND = "custom_model_development"
