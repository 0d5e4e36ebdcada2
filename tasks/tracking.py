"""MLflow tracking helpers for cubeline runs: store set-up, params, lineage tags, evaluation plots.

One flow run is one MLflow run. This module owns everything that *writes into* that run apart
from the model itself (``tasks/pyfunc_model.py``) and the registry (``tasks/registry.py``):

- :func:`configure_mlflow` points MLflow at an absolute SQLite store and artifact root (MLflow's
  own defaults are relative to the working directory) and fails fast on an unreachable server;
- :func:`flatten_params` turns the nested ``params.yaml`` into MLflow's flat string params;
- :func:`make_lightning_logger` attaches Lightning's ``MLFlowLogger`` to the flow's run;
- :func:`log_evaluation` writes ROC and precision-recall curves (Fawcett 2006, "An introduction to
  ROC analysis"; average precision as the step-wise area, as in scikit-learn), score histograms
  and per-frame anomaly maps, and logs them as artifacts;
- :func:`set_lineage_tags`, :func:`git_commit`, :func:`params_hash`: what produced the run.

mlflow, matplotlib and lightning are imported inside the functions that need them: importing
this module must stay cheap for the CLI (``../shared/STACK.md``: mlflow alone costs ~2.4 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodes.errors import CubelineError, DataValidationError

if TYPE_CHECKING:
    from filelock import BaseFileLock
    from lightning.pytorch.loggers import MLFlowLogger

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MAX_PARAM_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "TAG_DATA_HASH",
    "TAG_GIT_COMMIT",
    "TAG_INIT_STATE_HASH",
    "TAG_PARAMS_HASH",
    "LockTimeoutError",
    "TrackingUnavailableError",
    "average_precision",
    "configure_mlflow",
    "flatten_params",
    "git_commit",
    "lock_path",
    "log_evaluation",
    "make_lightning_logger",
    "params_hash",
    "pr_curve",
    "roc_curve",
    "set_lineage_tags",
    "uri_lock",
    "write_anomaly_maps",
    "write_evaluation_plots",
]

DEFAULT_EXPERIMENT = "cubeline"
_log = logging.getLogger(__name__)

#: MLflow 3.17's limits (``MAX_PARAM_VAL_LENGTH`` and ``MAX_ENTITY_KEY_LENGTH`` in
#: ``mlflow.utils.validation``), copied so that flattening params does not import mlflow. A test
#: checks they still agree.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAM_KEY_LENGTH = 250

#: The team's tracking store when params.yaml leaves ``mlflow.tracking_uri`` null.
TRACKING_URI_ENV = "CUBELINE_MLFLOW_TRACKING_URI"

TAG_DATA_HASH = "cubeline.data_hash"
TAG_INIT_STATE_HASH = "cubeline.init_state_hash"
TAG_PARAMS_HASH = "cubeline.params_hash"
TAG_GIT_COMMIT = "cubeline.git_commit"
#: MLflow's own tag, shown in its UI's run page.
_MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"

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


# --------------------------------------------------------------------------------------------
# Cross-process locks keyed on a store URI
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Store set-up
# --------------------------------------------------------------------------------------------


def _force_telemetry_off() -> None:
    # Forced, not defaulted: MLflow reads these when it starts its telemetry client, and only the
    # exact string "true" counts (../shared/STACK.md).
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


# --------------------------------------------------------------------------------------------
# Params, lineage
# --------------------------------------------------------------------------------------------


def _param_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, Path):
        text = value.as_posix()
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        # Marked, so nobody mistakes a clipped value for the real one.
        marker = "...[truncated]"
        text = text[: MAX_PARAM_VALUE_LENGTH - len(marker)] + marker
    return text


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested params into MLflow's flat ``{"a.b.c": "value"}`` string form.

    Lists of scalars are joined with commas (``[1, 2]`` → ``"1,2"``); lists holding mappings get
    their index in the key (``a.0.b``). Empty mappings and lists are kept as ``"{}"``/``""`` so
    the key still shows in the run. Values longer than MLflow's limit (6000 characters) are cut
    and end in ``...[truncated]``.

    Args:
        d: Nested mapping, e.g. the parsed ``params.yaml``.
        prefix: Key prefix (without the trailing dot).

    Returns:
        Flat mapping of dotted keys to strings.

    Raises:
        ValueError: A flattened key is longer than MLflow's 250-character key limit.
    """
    out: dict[str, str] = {}

    def key_of(k: Any) -> str:
        key = f"{prefix}.{k}" if prefix else str(k)
        if len(key) > MAX_PARAM_KEY_LENGTH:
            raise ValueError(
                f"Param key {key[:60]!r}... is {len(key)} characters, over MLflow's "
                f"{MAX_PARAM_KEY_LENGTH}. Fix: shorten the nesting in params.yaml."
            )
        return key

    for k, v in d.items():
        key = key_of(k)
        if isinstance(v, Mapping):
            if v:
                out.update(flatten_params(v, key))
            else:
                out[key] = "{}"
        elif _is_sequence(v):
            if any(isinstance(item, Mapping) or _is_sequence(item) for item in v):
                out.update(flatten_params({str(i): item for i, item in enumerate(v)}, key))
            else:
                out[key] = _param_value(",".join(_param_value(item) for item in v))
        else:
            out[key] = _param_value(v)
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """Return the SHA-256 (hex) of ``params`` in canonical JSON (sorted keys, no spaces).

    Key order in ``params.yaml`` does not change the hash; any value does.
    """
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def git_commit(repo_root: Path) -> str:
    """Return ``git rev-parse HEAD`` of ``repo_root``, with ``+dirty`` if the tree has changes.

    Untracked files that git does not ignore count as changes (they may be code). Returns
    ``"unknown"`` when ``repo_root`` is not a git checkout or git is missing: lineage is then
    carried by the data/params hashes alone.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # status must not take index.lock

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True,
                              check=True, timeout=30, env=env).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}+dirty" if status else head


def code_version(repo_root: Path) -> str:
    """:func:`git_commit`, plus a digest of the uncommitted changes when the tree is dirty.

    Two runs of one dirty tree compare equal only when their changes are the same (tracked
    diffs and the names and contents of untracked, unignored files).
    """
    commit = git_commit(repo_root)
    if not commit.endswith("+dirty"):
        return commit
    import hashlib

    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    digest = hashlib.sha256()
    try:
        for args in (["diff", "HEAD", "--binary"], ["ls-files", "-o", "--exclude-standard", "-z"]):
            out = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, check=True,
                                 timeout=60, env=env).stdout
            digest.update(out)
            if args[0] == "ls-files":
                for name in filter(None, out.split(b"\0")):
                    path = repo_root / name.decode()
                    if path.is_file():
                        digest.update(path.read_bytes())
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return commit
    return f"{commit}:{digest.hexdigest()[:16]}"


def set_lineage_tags(
    data_hash: str,
    init_state_hash: str,
    params_hash: str,
    git_commit: str,
    run_id: str | None = None,
) -> dict[str, str]:
    """Tag the run with what produced it: data, initialization state, params and code.

    Args:
        data_hash: DVC content hash of the input data.
        init_state_hash: Content hash of the Phase-1 initialization state used.
        params_hash: :func:`params_hash` of the effective params.
        git_commit: :func:`git_commit` of the code.
        run_id: Run to tag; None tags the active run.

    Returns:
        The tags written.

    Raises:
        TrackingUnavailableError: No run given and none active.
    """
    import mlflow

    tags = {
        TAG_DATA_HASH: data_hash,
        TAG_INIT_STATE_HASH: init_state_hash,
        TAG_PARAMS_HASH: params_hash,
        TAG_GIT_COMMIT: git_commit,
        _MLFLOW_GIT_COMMIT_TAG: git_commit,
    }
    target = _resolve_run_id(run_id)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(target, key, value)
    return tags


def _resolve_run_id(run_id: str | None) -> str:
    import mlflow

    if run_id is not None:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise TrackingUnavailableError(
            "No MLflow run is active and no run_id was given. Fix: call inside "
            "`with mlflow.start_run():` or pass run_id=."
        )
    return active.info.run_id


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


#: Most metrics MLflow takes in one ``log_batch`` call.
_MAX_METRICS_PER_BATCH = 1000
_SPLIT_PREFIXES = ("train/", "val/", "test/", "lr", "epoch", "phase1/", "phase2/")


def make_lightning_logger(
    run_id: str, tracking_uri: str, flush_interval_s: float = 10.0
) -> MLFlowLogger:
    """Return a Lightning ``MLFlowLogger`` that writes per-epoch metrics into an existing run.

    Changes from the stock logger, because the flow (not Lightning) owns the run:
    ``finalize`` does not mark the run FINISHED when ``fit`` ends (evaluation and registration
    still log into it), and Lightning's hyperparameters go under ``lightning.*`` so they cannot
    collide with the flattened ``params.yaml`` keys (MLflow refuses to change a logged param).

    Metrics are buffered and written in one ``log_batch`` once ``flush_interval_s`` has passed
    since the last write, and at ``finalize`` (also when ``fit`` fails): the stock logger's
    one store transaction per logging call cost ~0.1 s an epoch with the SQLite store here,
    while a long training still shows its curves in the UI every ``flush_interval_s``. (MLflow's
    own asynchronous logging was measured too: its flush waits up to 1 s on an idle queue, twice
    per run.) Each metric keeps the step and the time at which Lightning logged it.

    Args:
        run_id: The flow's MLflow run.
        tracking_uri: Tracking URI of that run (as returned by :func:`configure_mlflow`).
        flush_interval_s: Longest time metrics wait in the buffer while training runs.

    Returns:
        A logger to pass as ``GradientTrainer(logger=...)``.
    """
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from mlflow.entities import Metric

    class _RunAttachedMLFlowLogger(MLFlowLogger):
        _pending: list[Metric]
        _last_write = 0.0

        def log_hyperparams(self, params: Any) -> None:
            if not isinstance(params, Mapping):
                params = vars(params)
            flat = flatten_params(params, prefix="lightning")
            existing = self.experiment.get_run(self.run_id).data.params
            fresh = {k: v for k, v in flat.items() if existing.get(k) != v}
            if fresh:
                super().log_hyperparams(fresh)

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            if not hasattr(self, "_pending"):
                self._pending, self._last_write = [], time.monotonic()
            now_ms = int(time.time() * 1000)
            for key, value in metrics.items():
                if isinstance(value, str):
                    continue
                if not key.startswith(_SPLIT_PREFIXES):
                    # Per-epoch metric-node values are validation figures: under val/, apart from
                    # the test/ figures the gate reads.
                    key = f"val/{key}"
                name = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key
                # MLflow's allowed metric-name characters, as the stock logger sanitizes them.
                name = re.sub("[^a-zA-Z0-9_/. -]+", "", name)
                self._pending.append(Metric(name, float(value), now_ms, step or 0))
            if time.monotonic() - self._last_write >= flush_interval_s:
                self._write_pending()

        def _write_pending(self) -> None:
            pending = getattr(self, "_pending", [])
            for start in range(0, len(pending), _MAX_METRICS_PER_BATCH):
                self.experiment.log_batch(
                    run_id=self.run_id, metrics=pending[start : start + _MAX_METRICS_PER_BATCH]
                )
            self._pending, self._last_write = [], time.monotonic()

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            if getattr(self, "_pending", None):
                self._write_pending()
            if not self._initialized:
                return
            if self._checkpoint_callback:
                self._scan_and_log_checkpoints(self._checkpoint_callback)

    return _RunAttachedMLFlowLogger(run_id=run_id, tracking_uri=tracking_uri)


# --------------------------------------------------------------------------------------------
# Evaluation curves (numpy; no scikit-learn dependency)
# --------------------------------------------------------------------------------------------


def _binary_counts(
    scores: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct score, highest score first."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(targets, dtype=bool).ravel()
    order = np.argsort(s, kind="mergesort")[::-1]
    s, t = s[order], t[order]
    # The last index of each run of tied scores: a threshold cannot split ties.
    distinct = np.flatnonzero(np.diff(s)) if s.size > 1 else np.empty(0, dtype=np.int64)
    ends = np.r_[distinct, s.size - 1]
    tps = np.cumsum(t, dtype=np.float64)[ends]
    fps = (ends + 1) - tps
    return fps, tps, s[ends]


def roc_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Return ``(fpr, tpr, auc)`` of a score map against boolean targets.

    AUC is NaN when the targets hold only one class.
    """
    fps, tps, _ = _binary_counts(scores, targets)
    fps = np.r_[0.0, fps]
    tps = np.r_[0.0, tps]
    if tps[-1] == 0 or fps[-1] == 0:
        return fps, tps, math.nan
    fpr, tpr = fps / fps[-1], tps / tps[-1]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def pr_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(recall, precision)`` ordered by increasing recall, ending at (0, 1)."""
    fps, tps, _ = _binary_counts(scores, targets)
    if tps.size == 0 or tps[-1] == 0:
        return np.array([0.0]), np.array([1.0])
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    # Stop once full recall is reached; lower thresholds only add false positives.
    last = int(np.searchsorted(tps, tps[-1])) + 1
    return np.r_[recall[:last][::-1], 0.0], np.r_[precision[:last][::-1], 1.0]


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve, ``sum (R_n - R_{n-1}) P_n``."""
    recall, precision = pr_curve(scores, targets)
    if recall.size == 1:
        return math.nan
    return float(-np.sum(np.diff(recall) * precision[:-1]))


# --------------------------------------------------------------------------------------------
# Evaluation plots
# --------------------------------------------------------------------------------------------


def _check_eval_inputs(
    scores: np.ndarray, targets: np.ndarray, frame_ids: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    t = np.asarray(targets)
    if s.ndim != 3:
        raise DataValidationError(
            f"log_evaluation: scores must be (N, H, W), got shape {s.shape}. Fix: pass the "
            "per-pixel anomaly scores of the test frames stacked on axis 0."
        )
    if t.shape != s.shape:
        raise DataValidationError(
            f"log_evaluation: targets shape {t.shape} differs from scores shape {s.shape}. Fix: "
            "pass the ground-truth masks of the same frames."
        )
    if len(frame_ids) != s.shape[0]:
        raise DataValidationError(
            f"log_evaluation: {len(frame_ids)} frame ids for {s.shape[0]} frames. Fix: one id "
            "per frame, in the order of axis 0."
        )
    if not np.all(np.isfinite(s)):
        bad = int(np.size(s) - np.count_nonzero(np.isfinite(s)))
        raise DataValidationError(
            f"log_evaluation: scores hold {bad} non-finite values (NaN/inf). Fix: check the "
            "model (an unfitted or diverged node) before evaluating."
        )
    return s.astype(np.float64, copy=False), t.astype(bool, copy=False)


def _safe_name(frame_id: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(frame_id)).strip("._") or "frame"


def _figure(width: float, height: float) -> Any:
    """A headless Agg figure without pyplot (no global figure registry, no GUI backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Any, path: Path) -> Path:
    import io

    from tasks.env import atomic_write_bytes

    # A fixed layout (set per figure) instead of bbox_inches="tight", which draws twice.
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """At most ``max_points`` points of a monotone curve, its first and last kept."""
    if x.size <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
    return x[keep], y[keep]


def write_anomaly_maps(
    scores: np.ndarray,
    frame_ids: Sequence[Any],
    out_dir: Path,
    targets: np.ndarray | None = None,
    *,
    decisions: np.ndarray | None = None,
    score_label: str = "anomaly score",
    title_suffix: str = "",
) -> dict[str, Path]:
    """Write one PNG per frame: the score map, the model's decisions and the ground truth.

    The colour scale runs from the 1st to the 99.5th percentile of the frame's scores, so a few
    extreme pixels cannot turn the rest of the map black (the colour bar says so). Ground truth
    is a cyan outline and the model's decisions a magenta one, both named in a legend.

    Args:
        scores: (N, H, W) scores, all in one unit.
        frame_ids: One id per frame (used in titles and file names).
        out_dir: Directory for ``anomaly_map_<frame_id>.png``.
        targets: Optional (N, H, W) boolean ground truth.
        decisions: Optional (N, H, W) boolean decisions of the model.
        score_label: The unit of ``scores`` (raw RX score, logit, ...), on the colour bar.
        title_suffix: Added to each title (e.g. the model version).

    Returns:
        ``{"anomaly_map:<frame_id>": path}`` in frame order.
    """
    from matplotlib.lines import Line2D

    s = np.asarray(scores, dtype=np.float64)
    t = np.zeros(s.shape, dtype=bool) if targets is None else np.asarray(targets, dtype=bool)
    s, t = _check_eval_inputs(s, t, frame_ids)
    d = None if decisions is None else np.asarray(decisions, dtype=bool).reshape(s.shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    used: set[str] = set()
    for i, fid in enumerate(frame_ids):
        name = _safe_name(fid)
        while name in used:  # two ids that sanitize alike must not overwrite each other
            name += f"_{i}"
        used.add(name)
        fig = _figure(5.4, 5.0)
        ax = fig.add_axes((0.02, 0.1, 0.74, 0.8))
        cax = fig.add_axes((0.8, 0.14, 0.035, 0.72))
        finite = s[i][np.isfinite(s[i])]
        lo, hi = (np.percentile(finite, [1.0, 99.5]) if finite.size else (0.0, 1.0))
        if not hi > lo:
            lo, hi = float(lo) - 0.5, float(hi) + 0.5
        img = ax.imshow(s[i], cmap="inferno", interpolation="nearest", vmin=lo, vmax=hi)
        fig.colorbar(img, cax=cax, label=f"{score_label} (1st-99.5th pct, clipped)", extend="both")
        handles = []
        if targets is not None and t[i].any():
            ax.contour(t[i].astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.9)
            gt = f"ground truth ({int(t[i].sum())} px)"
            handles.append(Line2D([], [], color="cyan", label=gt))
        if d is not None and d[i].any():
            ax.contour(d[i].astype(np.float32), levels=[0.5], colors="magenta", linewidths=0.7,
                       linestyles="dashed")
            handles.append(Line2D([], [], color="magenta", linestyle="dashed",
                                  label=f"model decisions ({int(d[i].sum())} px)"))
        elif d is not None:
            handles.append(Line2D([], [], color="magenta", linestyle="dashed",
                                  label="model decisions (none)"))
        if handles:
            fig.legend(handles=handles, loc="lower left", fontsize=7, frameon=False, ncol=2)
        title = f"frame {fid}" + (f" — {title_suffix}" if title_suffix else "")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
        paths[f"anomaly_map:{fid}"] = _save(fig, out_dir / f"anomaly_map_{name}.png")
    return paths


def write_evaluation_plots(
    scores: np.ndarray,
    targets: np.ndarray,
    frame_ids: Sequence[Any],
    out_dir: Path,
    *,
    threshold: float | None = None,
    score_label: str = "anomaly score",
) -> dict[str, Path]:
    """Write ROC, PR, score-histogram and per-frame anomaly-map PNGs (no MLflow).

    Curves and histograms pool the pixels of all frames; anomaly maps are per frame. Curves
    are drawn through at most 2000 of their points (the AUROC/AP in the legends use all).

    Args:
        scores: (N, H, W) anomaly scores.
        targets: (N, H, W) boolean ground truth (True = anomaly).
        frame_ids: One id per frame.
        out_dir: Output directory (created).
        threshold: Decision threshold in the unit of ``scores``: the maps draw the decisions.
        score_label: The unit of ``scores`` (colour bar of the maps).

    Returns:
        ``{"roc_curve": ..., "pr_curve": ..., "score_histogram": ...,
        "anomaly_map:<frame_id>": ...}`` paths.
    """
    s, t = _check_eval_inputs(scores, targets, frame_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_pos, n_neg = int(t.sum()), int(t.size - t.sum())
    paths: dict[str, Path] = {}
    frame = (0.15, 0.12, 0.8, 0.8)  # axes box: room for tick labels, axis labels, title

    fpr, tpr, auc = roc_curve(s, t)
    fig = _figure(4.5, 4.5)
    ax = fig.add_axes(frame)
    if math.isnan(auc):
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    else:
        ax.plot(*_thin_curve(fpr, tpr), lw=1.5, label=f"AUROC = {auc:.4f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"ROC, {s.shape[0]} frames, {n_pos} anomaly / {n_neg} normal px", fontsize=9)
    paths["roc_curve"] = _save(fig, out_dir / "roc_curve.png")

    recall, precision = pr_curve(s, t)
    ap = average_precision(s, t)
    fig = _figure(4.5, 4.5)
    ax = fig.add_axes(frame)
    if math.isnan(ap):
        ax.text(0.5, 0.5, "undefined: no anomaly pixels", ha="center", va="center")
    else:
        ax.step(*_thin_curve(recall, precision), where="post", lw=1.5, label=f"AP = {ap:.4f}")
        ax.axhline(n_pos / t.size, ls="--", c="grey", lw=0.8, label="chance")
        ax.legend(loc="upper right")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("Precision-recall", fontsize=9)
    paths["pr_curve"] = _save(fig, out_dir / "pr_curve.png")

    fig = _figure(5.5, 4)
    ax = fig.add_axes((0.13, 0.13, 0.82, 0.78))
    lo, hi = float(s.min()), float(s.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
    # One filled step artist per class (not 60 bar patches each).
    density, _ = np.histogram(s[~t], bins=bins, density=True)
    ax.stairs(density, bins, fill=True, alpha=0.6, label=f"normal ({n_neg} px)")
    if n_pos:
        density, _ = np.histogram(s[t], bins=bins, density=True)
        ax.stairs(density, bins, fill=True, alpha=0.6, label=f"anomaly ({n_pos} px)")
    ax.set_yscale("log")
    ax.set(xlabel="anomaly score", ylabel="density (log)")
    ax.legend()
    ax.set_title("Score distribution by ground truth", fontsize=9)
    paths["score_histogram"] = _save(fig, out_dir / "score_histogram.png")

    decisions = None if threshold is None else s > threshold
    suffix = "" if threshold is None else f"decisions: {score_label} > {threshold:.3g}"
    paths.update(
        write_anomaly_maps(
            s, frame_ids, out_dir / "anomaly_maps", targets=t, decisions=decisions,
            score_label=score_label, title_suffix=suffix,
        )
    )
    return paths


def log_evaluation(
    scores: np.ndarray,
    targets: np.ndarray,
    frame_ids: Sequence[Any],
    out_dir: Path,
    *,
    run_id: str | None = None,
    artifact_path: str = "evaluation",
    threshold: float | None = None,
    score_label: str = "anomaly score",
) -> dict[str, Path]:
    """Write the evaluation plots (:func:`write_evaluation_plots`) and log them to the run.

    Args:
        scores: (N, H, W) anomaly scores of the test frames.
        targets: (N, H, W) boolean ground truth.
        frame_ids: One id per frame.
        out_dir: Local directory for the PNGs.
        run_id: Run to log into; None logs into the active run.
        artifact_path: Artifact directory inside the run (anomaly maps go one level below).
        threshold: Decision threshold in the unit of ``scores`` (drawn on the maps).
        score_label: The unit of ``scores``.

    Returns:
        The local paths written, keyed as in :func:`write_evaluation_plots`.

    Raises:
        DataValidationError: Shapes disagree or scores are not finite (nothing is written).
        TrackingUnavailableError: No run given and none active.
    """
    import mlflow

    target_run = _resolve_run_id(run_id)
    paths = write_evaluation_plots(
        scores, targets, frame_ids, out_dir, threshold=threshold, score_label=score_label
    )
    client = mlflow.MlflowClient()
    for key, path in paths.items():
        sub = f"{artifact_path}/anomaly_maps" if key.startswith("anomaly_map:") else artifact_path
        client.log_artifact(target_run, str(path), artifact_path=sub)
    return paths
