"""The Prefect tasks of cubeline: one task per pipeline step, thin wrappers around ``nodes``.

Steps: ``load_cubes`` (read + pandera-validate the frames, the design card's "load cu3s"),
``fit_statistics`` (Phase 1, versions the initialization state with DVC), ``drift_check``,
``unfreeze``, ``gradient_train`` (Phase 2), ``evaluate``, ``register_model``; plus
``emit_drift_event`` for the drift watch.

Tasks take and return small typed values -- paths, DVC hashes, run ids, metric dicts -- never
tensors: the cached steps' results are persisted (cloudpickle) and must stay small; the other
steps persist nothing. Every task reads ``params.yaml`` itself through :class:`RunContext`, so
its inputs are explicit.

**Cache.** ``fit_statistics`` reuses an earlier fit under a cache key: DVC content hash of the
data + hash of the ``params.yaml`` sections the step reads + the step's code (its ``version`` and
a digest of its source) + the repository root. A re-run with unchanged data and params therefore
skips Phase 1 without hashing a tensor. The entry is a small JSON file under
``<repo>/.prefect/results/steps/`` (ignored by git), validated field by field when read, never
unpickled; the state it names is restored and checked against its DVC hash before use.

**MLflow.** A flow run is one MLflow run, opened by :func:`tracked_run` (params flattened, tags)
and closed FINISHED or FAILED; tasks log into it by its id.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prefect import task

from nodes.errors import ConfigError, CubelineError
from tasks.env import process_alive, repo_root
from tasks.params import Params, load_params, resolve_path

if TYPE_CHECKING:
    from prefect.context import TaskRunContext

    from nodes.data.datamodule import CubeDataModule
    from nodes.graph.pipeline import Pipeline

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Bump a step's version when its behaviour changes in a way its source digest cannot see
#: (e.g. a change in the nodes it calls): cached results of the old version are then ignored.
STEP_VERSIONS: dict[str, str] = {
    "load_cubes": "2",
    "fit_statistics": "3",
    "drift_check": "1",
    "unfreeze": "1",
    "gradient_train": "1",
    "evaluate": "1",
    "register_model": "2",
    "emit_drift_event": "2",
    "ingest_inbox": "1",
    "combine_data": "1",
    "find_unchanged": "2",
}

DRIFT_EVENT = "cubeline.drift.detected"
SCORE_KEY = "logit_head.logits"  # the score the decider thresholds; curves and maps use it


# --------------------------------------------------------------------------------------------
# Small typed results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """Where a flow run reads its parameters and writes its outputs.

    Attributes:
        params_path: Absolute path of ``params.yaml``.
        root: Repository root (DVC repository, MLflow store, outputs).
        run_id: The flow run's MLflow run (None outside :func:`tracked_run`).
        run_dir: Local directory of this run's files (``outputs/runs/<run>``).
        tracking_uri: MLflow tracking URI in effect.
        reason: Why the flow runs (manual, schedule, drift event...), kept in the registry.
        trigger: What started it: ``manual``, ``manual via deployment``, ``schedule`` or
            ``drift event`` (:func:`describe_trigger`).
        flow_run_id: The Prefect flow run (None outside a flow).
    """

    params_path: str
    root: str
    run_id: str | None = None
    run_dir: str = ""
    tracking_uri: str | None = None
    reason: str = ""
    trigger: str = "manual"
    flow_run_id: str | None = None

    @property
    def params(self) -> Params:
        """The validated ``params.yaml`` (read on each access: tasks may run in new processes)."""
        return load_params(self.params_path)

    @property
    def out(self) -> Path:
        """The run directory, created on demand."""
        path = Path(self.run_dir or Path(self.root) / "outputs" / "runs" / "adhoc")
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class DataRef:
    """What ``load_cubes`` found: validated frames, by reference.

    Attributes:
        paths: Absolute data files, in frame-id order.
        train_ids: Training frame ids.
        val_ids: Validation frame ids.
        test_ids: Test frame ids.
        data_hash: DVC content hash of the data read (the cache keys use it).
        recorded_hash: Hash recorded in ``data.dvc``.
        dirty: The data differs from ``data.dvc``.
        num_frames: Frames available in ``paths``.
        shape: (H, W, C) of every frame.
        anomaly_pixels: Labelled anomaly pixels over the frames used.
        frame_names: ``<file>#<index>`` per frame id.
        version: The data version (``cubeline ingest``) read, None for ``params.yaml`` ``data``.
        annotation: COCO file labelling the frames, if any.
    """

    paths: tuple[str, ...]
    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    data_hash: str
    recorded_hash: str
    dirty: bool
    num_frames: int
    shape: tuple[int, int, int]
    anomaly_pixels: int
    frame_names: tuple[str, ...]
    version: str | None = None
    annotation: str | None = None

    @property
    def channels(self) -> int:
        """Bands per frame."""
        return self.shape[2]

    @property
    def split_names(self) -> dict[str, list[str]]:
        """Frame names per split (what the run trains, validates and tests on)."""
        return {
            k: [self.frame_names[i] for i in ids]
            for k, ids in (
                ("train", self.train_ids), ("val", self.val_ids), ("test", self.test_ids)
            )
        }


@dataclass(frozen=True)
class InitStateRef:
    """A Phase-1 initialization state, versioned by DVC.

    Attributes:
        state_hash: DVC hash (``<md5>.dir``) of the state directory; restorable by it.
        source_data_hash: Data hash the state was fitted on.
        pixel_count: Pixels accumulated.
        passes: Passes over the data.
        seconds: Wall time of the fit.
        val_metrics: Validation metrics of the Phase-1-only pipeline.
        cached: Reused from an earlier fit of the same data and params (not fitted now).
    """

    state_hash: str
    source_data_hash: str
    pixel_count: int
    passes: int
    seconds: float
    val_metrics: dict[str, float] = field(default_factory=dict)
    cached: bool = False


@dataclass(frozen=True)
class DriftResult:
    """Outcome of ``drift_check``.

    Attributes:
        reinitialize: Run Phase 1 again (drift found, or nothing to compare with).
        drifted: Drift was found (False when there was no reference).
        reason: Human-readable reason of the decision.
        fired: Criteria that fired.
        drifted_bands: Bands over a per-band threshold.
        champion_version: Registered version whose state was the reference.
        reference_state_hash: DVC hash of the reference state (reusable when no drift).
        report_path: JSON report ('' without reference).
        plot_path: Per-band PNG ('' without reference).
        summary: Small dict for event payloads and logs.
        data_version: Data version checked (None: ``params.yaml`` data).
        event_id: Id of the ``cubeline.drift.detected`` event emitted for it, if any.
        champion_run_id: MLflow run of the champion compared with.
    """

    reinitialize: bool
    drifted: bool
    reason: str
    fired: tuple[str, ...] = ()
    drifted_bands: tuple[int, ...] = ()
    champion_version: str | None = None
    reference_state_hash: str | None = None
    report_path: str = ""
    plot_path: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    data_version: str | None = None
    event_id: str | None = None
    champion_run_id: str | None = None


@dataclass(frozen=True)
class PipelineRef:
    """A pipeline on disk (YAML + sibling ``.pt``).

    Attributes:
        config_path: The YAML file.
        state_hash: Initialization state it was built from.
        reused_state: The state was the champion's (no Phase 1 in this run).
        unfrozen: Nodes trainable in Phase 2.
        trainable_parameters: Number of trainable scalars.
    """

    config_path: str
    state_hash: str
    reused_state: bool
    unfrozen: tuple[str, ...]
    trainable_parameters: int


@dataclass(frozen=True)
class TrainResult:
    """Outcome of ``gradient_train``.

    Attributes:
        config_path: The trained pipeline's YAML (weights beside it).
        state_hash: Initialization state it started from.
        val_metrics: Last validation metrics (best checkpoint restored, threshold calibrated).
        threshold: Calibrated decision threshold (logit units), if any.
        epochs: Epochs run.
        seconds: Wall time of the fit.
    """

    config_path: str
    state_hash: str
    val_metrics: dict[str, float]
    threshold: float | None
    epochs: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Test metrics on the pinned evaluation split.

    Attributes:
        metrics: ``{"metrics_anomaly/auroc": ..., ...}`` on the test frames.
        split_id: Id of the pinned split (data hash + test frames).
        artifacts: Local paths of the plots written.
    """

    metrics: dict[str, float]
    split_id: str
    artifacts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrationSummary:
    """What ``register_model`` did (plain values of ``tasks.registry.RegistrationResult``)."""

    model_name: str
    version: str
    alias: str
    promoted: bool
    reason: str
    champion_version: str | None
    previous_champion_version: str | None
    model_uri: str
    champion_metrics: dict[str, float] = field(default_factory=dict)
    unchanged: bool = False


@dataclass(frozen=True)
class RunSummary:
    """What a ``train``/``retrain`` flow run did (the ``cubeline run`` summary).

    Attributes:
        flow: Flow name.
        ctx: The run context (MLflow run id, run directory, tracking URI).
        data: The data trained on.
        state_hash: Initialization state used.
        phase1: ``fitted`` (ran now), ``cached`` (skipped: same data and params) or ``reused``
            (the champion's state, no drift).
        drift: The drift check (retrain only).
        train: Phase-2 outcome (None when the run changed nothing).
        evaluation: Test metrics (None when the run changed nothing).
        registration: Registry outcome (None when the run changed nothing).
        phase1_reason: Why Phase 1 was fitted, cached or reused.
        unchanged_version: The registered version that already holds this exact model (same
            data, params, Phase-1 state and code): nothing was trained or registered.
        champion_metrics: The champion's test metrics on the same frames, when known.
    """

    flow: str
    ctx: RunContext
    data: DataRef
    state_hash: str
    phase1: str
    drift: DriftResult | None
    train: TrainResult | None
    evaluation: EvalResult | None
    registration: RegistrationSummary | None
    phase1_reason: str = ""
    unchanged_version: str | None = None
    champion_metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Cache keys
# --------------------------------------------------------------------------------------------


def _digest(*parts: object) -> str:
    blob = json.dumps([str(p) for p in parts], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _code_digest(fn: Callable[..., Any]) -> str:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:12]
    except (OSError, TypeError):
        return "nosource"


def _step_key(sections: tuple[str, ...]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Cache key: data hash + params sections + code + repository, for a step's task."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        ctx: RunContext = parameters["ctx"]
        data: DataRef = parameters["data"]
        t = context.task
        return "-".join(
            (
                t.name,
                f"v{t.version}",
                _code_digest(t.fn),
                data.data_hash.replace(".", "_"),
                ctx.params.section_hash(*sections),
                _digest(Path(ctx.root).resolve()),
            )
        )

    return key


# --------------------------------------------------------------------------------------------
# Helpers (data, pipeline, MLflow)
# --------------------------------------------------------------------------------------------


def _data_paths(ctx: RunContext) -> list[Path]:
    return [resolve_path(ctx.params_path, p) for p in ctx.params.data.paths]


def _data_version(ctx: RunContext) -> Any:
    from tasks.versioning import data_version, ensure_data

    p = ctx.params
    root = Path(ctx.root)
    ensure_data(root, p.data.dvc_file, p.dvc.remote)
    return data_version(root, p.data.dvc_file, _data_paths(ctx))


#: One validated datamodule per process: tasks of one flow run share it instead of re-reading
#: and re-validating every frame (the data hash is part of the key, so a change is never missed).
_DM_MEMO: dict[tuple[object, ...], CubeDataModule] = {}


def _datamodule(
    ctx: RunContext,
    data_hash: str,
    paths: Sequence[str],
    splits: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    annotation: str | None,
) -> CubeDataModule:
    """A set-up (hence pandera-validated) datamodule over ``paths``, shared within the process."""
    from nodes.data.datamodule import CubeDataModule

    p = ctx.params
    key = (
        data_hash,
        tuple(paths),
        splits,
        annotation,
        p.section_hash("data"),
        p.pipeline.normal_class_ids,
    )
    dm = _DM_MEMO.get(key)
    if dm is None:
        train, val, test = splits
        dm = CubeDataModule(
            list(paths),
            list(train),
            list(val),
            list(test),
            batch_size=p.data.batch_size,
            annotation_path=annotation,
            expected_channels=p.data.expected_channels,
            normal_class_ids=p.pipeline.normal_class_ids,
            seed=p.phase2.seed,
        )
        dm.setup("fit")
        _DM_MEMO.clear()
        _DM_MEMO[key] = dm
    return dm


def _dm(ctx: RunContext, data: DataRef) -> CubeDataModule:
    return _datamodule(
        ctx,
        data.data_hash,
        data.paths,
        (data.train_ids, data.val_ids, data.test_ids),
        data.annotation,
    )


def build_pipeline(
    params: Params, input_channels: int, selector_mode: str | None = None
) -> Pipeline:
    """The channel-selector pipeline of ``params.pipeline`` for ``input_channels`` bands.

    Args:
        params: The run's params.
        input_channels: Bands of the data.
        selector_mode: ``hard`` / ``soft``; None: ``params.pipeline.selector_mode`` (``auto``
            there must be resolved first: the initialization state records the mode it chose).
    """
    from nodes.library.presets import build_channel_selector_pipeline

    pp = params.pipeline
    mode = selector_mode or pp.selector_mode
    if mode == "auto":
        raise ConfigError(
            "pipeline.selector_mode auto is resolved by Phase 1 (fit_statistics); build the "
            "pipeline with the mode its initialization state records"
        )
    return build_channel_selector_pipeline(
        input_channels=input_channels,
        n_select=pp.n_select,
        eps=pp.eps,
        temperature_init=pp.temperature_init,
        bce_weight=pp.bce_weight,
        normal_class_ids=pp.normal_class_ids,
        threshold=pp.threshold,
        name=pp.name,
        selector_mode=mode,
    )


def _states_dir(ctx: RunContext) -> Path:
    return resolve_path(ctx.params_path, ctx.params.dvc.states_dir)


def _restore_state(ctx: RunContext, state_hash: str) -> Path:
    from tasks.versioning import restore_init_state

    return restore_init_state(
        state_hash, root=Path(ctx.root), remote=ctx.params.dvc.remote, states_dir=_states_dir(ctx)
    )


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def _log_metrics(ctx: RunContext, metrics: Mapping[str, float], prefix: str = "") -> None:
    if ctx.run_id is None:
        return
    import math

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(f"{prefix}{k}", float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    if batch:
        _client().log_batch(ctx.run_id, metrics=batch)


def _log_artifact(ctx: RunContext, path: Path, artifact_path: str) -> None:
    if ctx.run_id is not None:
        _client().log_artifact(ctx.run_id, str(path), artifact_path=artifact_path)


def set_run_tags(ctx: RunContext, tags: Mapping[str, str]) -> None:
    """Tag the flow's MLflow run (nothing outside :func:`tracked_run`)."""
    if ctx.run_id is None:
        return
    client = _client()
    for k, v in tags.items():
        client.set_tag(ctx.run_id, k, v)


def describe_trigger(
    params: Params,
    note: str = "",
    *,
    event_id: str | None = None,
    data_version: str | None = None,
) -> tuple[str, str]:
    """What started this flow run, as ``(trigger, reason)``, from Prefect's own record of it.

    ``drift event <id> on data <hash>`` when a drift event's trigger passed its id;
    ``schedule <cron or interval>`` only when the server's scheduler created the run
    (``auto_scheduled``); ``manual via deployment <name>`` for a deployment run someone asked for
    (UI, ``prefect deployment run``); ``manual`` otherwise. ``note`` (``--reason``) is appended.
    """
    from prefect.context import FlowRunContext

    fr = FlowRunContext.get()
    run = fr.flow_run if fr is not None else None
    if event_id:
        trigger, reason = "drift event", f"drift event {event_id} on data {data_version or '?'}"
    elif run is not None and run.deployment_id is not None:
        deployment = _deployment(run.deployment_id)
        name = deployment.name if deployment is not None else str(run.deployment_id)
        if run.auto_scheduled:
            trigger, reason = "schedule", f"schedule {_schedule_text(deployment, params)}"
        else:
            trigger, reason = "manual via deployment", f"manual via deployment {name}"
    else:
        trigger, reason = "manual", "manual"
    return trigger, f"{reason}: {note}" if note else reason


def _deployment(deployment_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_deployment(deployment_id)
    except Exception:
        log.warning("could not read deployment %s for the run's reason", deployment_id)
        return None


def _schedule_text(deployment: Any, params: Params) -> str:
    """The deployment's active schedule as text (``params.yaml`` ``schedule`` if unknown)."""
    for sched in getattr(deployment, "schedules", None) or []:
        if not getattr(sched, "active", True):
            continue
        inner = sched.schedule
        if getattr(inner, "cron", None):
            return f"{inner.cron} ({getattr(inner, 'timezone', None) or 'UTC'})"
        if getattr(inner, "interval", None) is not None:
            return f"every {int(inner.interval.total_seconds())} s"
        return str(inner)
    return f"{params.schedule.retrain_cron} ({params.schedule.timezone})"


@contextmanager
def tracked_run(
    params_path: str | Path | None,
    flow_name: str,
    note: str = "",
    *,
    event_id: str | None = None,
    data_version: str | None = None,
) -> Iterator[RunContext]:
    """Open the MLflow run of one flow run; yields the :class:`RunContext` the tasks take.

    Configures MLflow (default: ``<repo>/mlflow.db`` + ``<repo>/mlartifacts``), starts a run
    tagged with the flow and the Prefect flow-run id, logs every ``params.yaml`` value
    (flattened) and the params hash and git commit; ends the run FINISHED, or FAILED when the
    body raises.

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        flow_name: Name of the flow (run name prefix, tag).
        note: The operator's words on why it runs (``--reason``), added to the trigger.
        event_id: The drift event that triggered it (deployment trigger parameter).
        data_version: The data version the event named.

    Raises:
        ConfigError: params.yaml is invalid (before any run is created).
        TrackingUnavailableError: The tracking store cannot be reached (fails fast).
    """
    import mlflow

    from tasks.tracking import (
        TAG_GIT_COMMIT,
        TAG_PARAMS_HASH,
        configure_mlflow,
        flatten_params,
        git_commit,
    )

    path = Path(params_path) if params_path else repo_root() / "params.yaml"
    path = (path / "params.yaml" if path.is_dir() else path).resolve()
    params = load_params(path)
    root = repo_root(path.parent)
    uri = configure_mlflow(
        params.mlflow.tracking_uri, root, experiment_name=params.mlflow.experiment
    )
    flow_run_id, flow_run_name = _prefect_flow_run()
    trigger, reason = describe_trigger(params, note, event_id=event_id, data_version=data_version)
    reconcile_dead_runs()
    run = mlflow.start_run(
        run_name=f"{flow_name}-{flow_run_name or uuid.uuid4().hex[:8]}",
        tags={
            "cubeline.flow": flow_name,
            "cubeline.reason": reason[:5000],
            "cubeline.trigger": trigger,
            "cubeline.event_id": event_id or "",
            "cubeline.host": socket.gethostname(),
            "cubeline.pid": str(os.getpid()),
            "prefect.flow_run_id": flow_run_id or "",
            TAG_PARAMS_HASH: params.section_hash(),
            TAG_GIT_COMMIT: git_commit(root),
        },
    )
    run_id = run.info.run_id
    run_dir = root / "outputs" / "runs" / run_id
    ctx = RunContext(
        str(path), str(root), run_id, str(run_dir), uri, reason, trigger, flow_run_id
    )
    try:
        flat = flatten_params(params.to_dict())
        mlflow.log_params(flat)
        yield ctx
    except BaseException as exc:
        mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")


def reconcile_dead_runs() -> list[str]:
    """Mark KILLED the runs of the active experiment left RUNNING by a process that is gone.

    A run records the host and pid of the process that opened it; one still RUNNING whose
    process no longer exists on this host was ended by a kill (SIGKILL, power loss) before it
    could close itself. Runs of other hosts are left alone (their processes cannot be checked).

    Returns:
        The ids of the runs marked KILLED.
    """
    from mlflow.tracking.fluent import _get_experiment_id

    client = _client()
    experiment_id = _get_experiment_id()
    if not experiment_id:
        return []
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`cubeline.host` = '{host}'",
    )
    killed = []
    for run in runs:
        try:
            pid = int(run.data.tags.get("cubeline.pid", ""))
        except ValueError:
            continue
        if pid == os.getpid() or process_alive(pid):
            continue
        client.set_tag(
            run.info.run_id,
            "cubeline.outcome",
            f"killed: process {pid} on {host} ended without closing the run (marked KILLED by "
            f"process {os.getpid()})",
        )
        client.set_terminated(run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
    if killed:
        log.warning("marked KILLED %d run(s) left RUNNING by dead processes: %s", len(killed),
                    killed)
    return killed


def _prefect_flow_run() -> tuple[str | None, str | None]:
    from prefect.context import FlowRunContext

    fr = FlowRunContext.get()
    if fr is None or fr.flow_run is None:
        return None, None
    return str(fr.flow_run.id), fr.flow_run.name


def _ensure_active_run(ctx: RunContext) -> None:
    """Make the flow's run active in this thread (``mlflow.pyfunc.log_model`` logs there)."""
    import mlflow

    active = mlflow.active_run()
    if ctx.run_id is None:
        raise ConfigError("register_model needs an MLflow run: call it inside tracked_run()")
    if active is None or active.info.run_id != ctx.run_id:
        mlflow.start_run(run_id=ctx.run_id)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@task(name="load_cubes", version=STEP_VERSIONS["load_cubes"], persist_result=False)
def load_cubes(ctx: RunContext, data_version: str | None = None) -> DataRef:
    """Read and validate the frames (pandera) and return a reference to them.

    Args:
        ctx: Run context.
        data_version: A data version (``cubeline ingest``) to read, restored by its DVC hash
            with its own split; None reads ``params.yaml`` ``data`` (the files tracked by
            ``data.dvc``, split by its ids).

    Returns:
        Paths, DVC content hash, frame count and shape; never the tensors.

    Raises:
        DataValidationError: A frame fails validation (the pandera report names file, field,
            fix): the flow stops here, before anything is trained or registered.
        ConfigError: The data version is unknown here and on the DVC remote.
    """
    from nodes.data.readers import count_frames

    p = ctx.params
    annotation: str | None
    if data_version:
        info = _restore_version(ctx, data_version)
        files = list(info.files)
        names = info.frame_names
        splits = (info.split.train, info.split.val, info.split.test)
        data_hash = recorded = info.version
        dirty = False
        annotation = info.annotation
    else:
        version = _data_version(ctx)
        files = [str(f) for f in _data_paths(ctx)]
        names = tuple(f"{Path(f).name}#{i}" for f in files for i in range(count_frames(f)))
        splits = (p.data.train_ids, p.data.val_ids, p.data.test_ids)
        data_hash, recorded, dirty = version.content_hash, version.recorded_hash, version.dirty
        annotation = (
            str(resolve_path(ctx.params_path, p.data.annotation_path))
            if p.data.annotation_path
            else None
        )
    info_dm = _datamodule(ctx, data_hash, files, splits, annotation).describe()
    h, w, c = (int(v) for v in info_dm["shape"])
    ref = DataRef(
        paths=tuple(files),
        train_ids=splits[0],
        val_ids=splits[1],
        test_ids=splits[2],
        data_hash=data_hash,
        recorded_hash=recorded,
        dirty=dirty,
        num_frames=int(info_dm["num_frames"]),
        shape=(h, w, c),
        anomaly_pixels=int(info_dm["anomaly_pixels"]),
        frame_names=names,
        version=data_version or None,
        annotation=annotation,
    )
    return ref


def record_data(ctx: RunContext, data: DataRef) -> None:
    """Tag the run with the data it reads: hash, version and the frames of each split."""
    set_run_tags(
        ctx,
        {
            "cubeline.data_hash": data.data_hash,
            "cubeline.data_version": data.version or "",
            "cubeline.data_split": json.dumps(data.split_names, separators=(",", ":"))[:5000],
        },
    )


def _versions_dir(ctx: RunContext) -> Path:
    return resolve_path(ctx.params_path, ctx.params.dvc.versions_dir)


def _restore_version(ctx: RunContext, version: str) -> Any:
    from tasks.data_versions import restore_data_version

    return restore_data_version(
        version, root=Path(ctx.root), remote=ctx.params.dvc.remote, versions_dir=_versions_dir(ctx)
    )


def ingest_files(
    params_path: str | Path,
    files: Sequence[str | Path],
    *,
    labels: str | Path | None = None,
    split: Any = None,
    parents: Sequence[str] = (),
) -> Any:
    """Validate frames and store them as a new data version (``cubeline ingest``).

    Args:
        params_path: ``params.yaml`` (band count, DVC remote, default split).
        files: Frame files in frame order.
        labels: COCO annotation file (None: the files carry their masks).
        split: A :class:`tasks.data_versions.Split` (None: ``params.yaml`` ``ingest``'s default).
        parents: Versions this one combines.

    Returns:
        The :class:`tasks.data_versions.DataVersionInfo` stored and pushed.
    """
    from tasks.data_versions import ingest_frames

    params = load_params(params_path)
    root = repo_root(Path(params_path).resolve().parent)
    return ingest_frames(
        files,
        root=root,
        remote=params.dvc.remote,
        versions_dir=resolve_path(params_path, params.dvc.versions_dir),
        expected_channels=params.data.expected_channels,
        normal_class_ids=params.pipeline.normal_class_ids,
        labels=labels,
        split=split,
        val_frames=params.ingest.val_frames,
        test_frames=params.ingest.test_frames,
        parents=parents,
    )


@task(name="ingest_inbox", version=STEP_VERSIONS["ingest_inbox"], persist_result=False)
def ingest_inbox(ctx: RunContext) -> str | None:
    """Turn the frames waiting in ``params.yaml`` ``ingest.inbox`` into a new data version.

    The files (and ``ingest.labels``, a COCO file, when present) are ingested in name order and
    then moved to ``<inbox>/.ingested/<md5>/``; invalid frames stay where they are and the
    error names them.

    Returns:
        The new version's hash, or None when the inbox holds no frame.
    """
    from tasks.data_versions import SUFFIXES

    p = ctx.params
    inbox = resolve_path(ctx.params_path, p.ingest.inbox)
    files = sorted(f for f in inbox.glob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
    if not files:
        log.info("inbox %s holds no frame: nothing to check", inbox)
        return None
    labels = inbox / p.ingest.labels
    info = ingest_files(ctx.params_path, files, labels=labels if labels.is_file() else None)
    done = inbox / ".ingested" / info.version.removesuffix(".dir")
    done.mkdir(parents=True, exist_ok=True)
    for f in [*files, labels]:
        if f.is_file():
            f.rename(done / f.name)
    return str(info.version)


@task(name="combine_data", version=STEP_VERSIONS["combine_data"], persist_result=False)
def combine_data(ctx: RunContext, data: DataRef, champion_run_id: str | None) -> DataRef:
    """``retrain.on_drift_data: old_and_new``: the champion's training frames + ``data``.

    The result is a data version of its own (validation and test frames: ``data``'s), so the
    run still trains on one explicit, restorable version.
    """
    from tasks.data_versions import DataVersionInfo, Split, combine_versions

    p = ctx.params
    if data.version is None:
        raise ConfigError(
            "retrain.on_drift_data: old_and_new combines a new data version with the champion's "
            "data; this run reads params.yaml data (no version): pass --data-version"
        )
    new = _restore_version(ctx, data.version)
    old_version = ""
    if champion_run_id:
        old_version = _client().get_run(champion_run_id).data.tags.get("cubeline.data_version", "")
    if old_version:
        old = _restore_version(ctx, old_version)
    else:
        from nodes.data.readers import count_frames

        files = tuple(str(f) for f in _data_paths(ctx))
        old = DataVersionInfo(
            version=_data_version(ctx).content_hash,
            path=repo_root(Path(ctx.params_path).parent),
            files=files,
            split=Split(p.data.train_ids, p.data.val_ids, p.data.test_ids),
            annotation=None,
            frame_names=tuple(f"{Path(f).name}#{i}" for f in files for i in range(count_frames(f))),
            channels=data.channels,
        )
    combined = combine_versions(
        old,
        new,
        root=Path(ctx.root),
        remote=p.dvc.remote,
        versions_dir=_versions_dir(ctx),
        expected_channels=p.data.expected_channels,
        normal_class_ids=p.pipeline.normal_class_ids,
    )
    return load_cubes.fn(ctx, combined.version)


@task(name="fit_statistics", version=STEP_VERSIONS["fit_statistics"], persist_result=False)
def fit_statistics(ctx: RunContext, data: DataRef, use_cache: bool = True) -> InitStateRef:
    """Phase 1: fit the statistical nodes, save the initialization state, version it with DVC.

    With ``use_cache``, an earlier fit of the same data, params sections and step code (the
    step's cache key) is reused when its state is still restorable and matches its hash.

    Returns:
        The state's DVC hash and the fit's figures (``cached`` when reused).

    Raises:
        ConfigError: ``phase1.sharding`` asks for a runner that cannot start here.
    """
    from types import SimpleNamespace

    from nodes.training.init_state import save_init_state
    from nodes.training.statistical_trainer import StatisticalTrainer
    from tasks.sharding import shard_runner_scope
    from tasks.versioning import STATE_FILE, version_init_state

    key = _step_key(("data", "pipeline", "phase1"))(
        SimpleNamespace(task=fit_statistics),  # type: ignore[arg-type]
        {"ctx": ctx, "data": data},
    )
    if use_cache:
        hit = _cache_get(ctx, key, InitStateRef)
        if hit is not None:
            try:
                _restore_state(ctx, hit.state_hash)  # present, and verified against its hash
                return InitStateRef(**{**hit.__dict__, "cached": True})
            except CubelineError as exc:
                log.warning("cached Phase-1 state %s unusable (%s): fitting again", hit, exc)
    p = ctx.params
    dm = _dm(ctx, data)
    # selector_mode auto: both readings of the selector are fitted; the one with the higher
    # Phase-1 validation AP is kept (recorded in the state and the run).
    modes = ("soft", "hard") if p.pipeline.selector_mode == "auto" else (p.pipeline.selector_mode,)
    fits = []
    for mode in modes:
        pipeline = build_pipeline(p, data.channels, selector_mode=mode)
        # runner: inprocess gives None (the trainer's own loop); dask shards every pass over
        # Prefect's DaskTaskRunner and merges the moment states exactly.
        with shard_runner_scope(p.phase1.sharding, dm) as shard_runner:
            trainer = StatisticalTrainer(
                pipeline,
                dm,
                normal_only=p.phase1.normal_only,
                sample_fraction=p.phase1.sample_fraction,
                seed=p.phase1.seed,
                shard_runner=shard_runner,
            )
            report = trainer.fit()
        scores = {k: float(v) for k, v in trainer.validate().items()}
        fits.append((mode, pipeline, trainer, report, scores))
    mode_ap = {m: v.get("metrics_anomaly/ap", float("nan")) for m, _, _, _, v in fits}
    mode, pipeline, trainer, report, val = max(
        fits, key=lambda f: (math.isfinite(mode_ap[f[0]]), mode_ap[f[0]])
    )
    if len(fits) > 1:
        log.info("selector_mode auto: Phase-1 val AP %s -> %s", mode_ap, mode)
    quality: dict[str, float] = {}
    if p.phase1.init_check != "off":
        # The guide's "validate initialization quality", in its correct form for RX: held-out
        # normal pixels score about C on average (nodes/training/quality.py). refuse stops the run
        # here.
        checks = trainer.check_initialization("val", strict=p.phase1.init_check == "refuse")
        for q in checks.values():
            quality.update(q.to_metrics())
            for why in q.reasons:
                (log.warning if p.phase1.init_check == "warn" else log.info)(
                    "Phase-1 initialization of %s: %s", q.node, why
                )
    states = _states_dir(ctx)
    staging = states / f".staging-{uuid.uuid4().hex}"
    try:
        info = save_init_state(
            pipeline,
            staging / STATE_FILE,
            source_data_hash=data.data_hash,
            fit_report=report,
            record_time=False,  # content-addressed: same fit, same hash (MLflow has the time)
            extra={
                "params_phase1": p.phase1.to_dict(),
                "params_pipeline": p.pipeline.to_dict(),
                "val_metrics": val,
                "init_quality": quality,
                "selector_mode": mode,
                "selector_mode_val_ap": mode_ap,
            },
        )
        state_hash = version_init_state(
            staging, root=Path(ctx.root), remote=p.dvc.remote, states_dir=states
        )
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    ref = InitStateRef(
        state_hash=state_hash,
        source_data_hash=data.data_hash,
        pixel_count=info.pixel_count,
        passes=report.passes,
        seconds=report.seconds,
        val_metrics=val,
    )
    _cache_put(ctx, key, ref)
    return ref


def _cache_file(ctx: RunContext, key: str) -> Path:
    from tasks.env import results_dir

    return results_dir(Path(ctx.root)) / "steps" / f"{key}.json"


def _cache_get(ctx: RunContext, key: str, cls: type[_T]) -> _T | None:
    """A cached step result: plain JSON checked field by field (pydantic), never code.

    Prefect's own result persistence would unpickle whatever a result file holds; a step result
    here is a small typed value, so JSON is enough, and a file that does not validate is a miss.
    """
    from pydantic import TypeAdapter, ValidationError

    path = _cache_file(ctx, key)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        return TypeAdapter(cls).validate_json(raw, strict=False)
    except ValidationError as exc:
        log.warning("ignoring step cache entry %s: not a valid %s (%s)", path, cls.__name__,
                    exc.error_count())
        return None


def _cache_put(ctx: RunContext, key: str, value: Any) -> None:
    """Write a step result as JSON, atomically (temporary file + rename)."""
    from tasks.env import atomic_write_bytes

    try:
        atomic_write_bytes(_cache_file(ctx, key), json.dumps(asdict(value)).encode())
    except OSError as exc:  # a read-only cache costs a refit next time, nothing else
        log.warning("step cache not written (%s)", exc)


def _stream_moments(dm: CubeDataModule, normal_only: bool) -> Any:
    """Raw-band moments of the training frames in one streaming pass (same pixels as Phase 1)."""
    from nodes.training.stats import MomentAccumulator

    acc: MomentAccumulator | None = None
    for batch in dm.train_dataloader():
        cube = batch["cube"]
        pixels = cube.reshape(-1, cube.shape[-1])
        if normal_only:
            pixels = pixels[~batch["mask"].reshape(-1)]
        if acc is None:
            acc = MomentAccumulator(int(cube.shape[-1]))
        acc.update(pixels)
    if acc is None:
        raise ConfigError("drift check: the training split yielded no batch")
    return acc.finalize()


@task(name="drift_check", version=STEP_VERSIONS["drift_check"], persist_result=False)
def drift_check(ctx: RunContext, data: DataRef) -> DriftResult:
    """Compare the data's statistics with the champion's initialization state.

    One streaming pass over the training frames; the reference is the raw-band moments stored
    in the champion's DVC-versioned state (no second copy of the reference data). Writes a JSON
    report and a per-band plot and logs them to the run.

    Returns:
        ``reinitialize=True`` when drift is found or there is no champion to compare with.

    Raises:
        DataValidationError: The frames have another band count than the champion's state.
    """
    from nodes.training.drift import compare_moments, plot_drift_report
    from nodes.training.init_state import read_init_info, read_init_moments
    from tasks.registry import CHAMPION, get_alias_version
    from tasks.tracking import TAG_INIT_STATE_HASH

    p = ctx.params
    champion = get_alias_version(p.registry.model_name, CHAMPION)
    if champion is None:
        return DriftResult(
            reinitialize=True,
            drifted=False,
            reason=f"no champion of {p.registry.model_name!r} yet: nothing to compare with, "
            "Phase 1 initializes from the data",
            data_version=data.version,
        )
    run = _client().get_run(champion.run_id) if champion.run_id else None
    state_hash = run.data.tags.get(TAG_INIT_STATE_HASH) if run is not None else None
    if not state_hash:
        return DriftResult(
            reinitialize=True,
            drifted=False,
            reason=f"champion version {champion.version} records no initialization state "
            f"(tag {TAG_INIT_STATE_HASH}): Phase 1 initializes from the data",
            champion_version=str(champion.version),
            data_version=data.version,
            champion_run_id=champion.run_id,
        )
    state_path = _restore_state(ctx, state_hash)
    reference = read_init_moments(state_path)
    current = _stream_moments(_dm(ctx, data), p.phase1.normal_only)
    report = compare_moments(reference, current, p.drift.thresholds())
    # A state fitted under other pipeline/Phase-1 params does not fit this pipeline, drift or not.
    fitted_with = read_init_info(state_path).extra
    changed = [
        name
        for name in ("pipeline", "phase1")
        if fitted_with.get(f"params_{name}") != getattr(p, name).to_dict()
    ]
    reason = report.reason
    if changed:
        reason += (
            f"; the champion's state was fitted with other params.yaml {' and '.join(changed)} "
            "settings: Phase 1 runs again"
        )
    out = ctx.out / "drift"
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "drift_report.json"
    report_path.write_text(
        json.dumps(
            {
                **report.to_dict(),
                "champion_version": str(champion.version),
                "reference_state_hash": state_hash,
                "data_hash": data.data_hash,
            },
            indent=2,
        )
    )
    plot_path = plot_drift_report(
        report,
        out / "drift_bands.png",
        title=f"data {data.data_hash[:8]} vs champion v{champion.version}",
    )
    _log_artifact(ctx, report_path, "drift")
    _log_artifact(ctx, plot_path, "drift")
    _log_metrics(ctx, {c.name: c.value for c in report.criteria}, prefix="drift/")
    _log_metrics(ctx, {"drifted": float(report.drifted)}, prefix="drift/")
    return DriftResult(
        reinitialize=report.drifted or bool(changed),
        drifted=report.drifted,
        reason=reason,
        fired=report.fired,
        drifted_bands=report.drifted_bands,
        champion_version=str(champion.version),
        reference_state_hash=state_hash,
        report_path=str(report_path),
        plot_path=str(plot_path),
        summary={
            **report.summary(),
            "criteria": [asdict(c) for c in report.criteria],
            "champion_version": str(champion.version),
        },
        data_version=data.version,
        champion_run_id=champion.run_id,
    )


@task(name="unfreeze", version=STEP_VERSIONS["unfreeze"], persist_result=False)
def unfreeze(ctx: RunContext, data: DataRef, state_hash: str, reused: bool) -> PipelineRef:
    """Build the pipeline from an initialization state and unfreeze the Phase-2 nodes.

    Restores the state by its DVC hash (cache or remote), tags the run with its lineage (data,
    state, params, code) and saves the unfrozen pipeline for ``gradient_train``.

    Args:
        ctx: Run context.
        data: The data the run trains on.
        state_hash: DVC hash of the initialization state (fitted now, or the champion's).
        reused: The state is the champion's (Phase 1 skipped after a drift check).
    """
    from nodes.training.init_state import load_init_state, read_init_info
    from tasks.tracking import git_commit, set_lineage_tags

    p = ctx.params
    state_path = _restore_state(ctx, state_hash)
    info = read_init_info(state_path)
    mode = info.extra.get("selector_mode") or p.pipeline.selector_mode
    pipeline = build_pipeline(p, data.channels, selector_mode=mode)
    load_init_state(pipeline, state_path)
    pipeline.unfreeze_nodes_by_name(p.pipeline.unfreeze)
    cfg, _ = pipeline.save_to_file(ctx.out / "pipeline_init.yaml")
    trainable = sum(t.numel() for t in pipeline.parameters() if t.requires_grad)
    if ctx.run_id is not None:
        set_lineage_tags(
            data.data_hash, state_hash, p.section_hash(), git_commit(Path(ctx.root)), ctx.run_id
        )
        set_run_tags(
            ctx,
            {
                "cubeline.init_state_reused": str(reused).lower(),
                "cubeline.data_dirty": str(data.dirty).lower(),
                "cubeline.data_recorded_hash": data.recorded_hash,
                "cubeline.init_state_source_data_hash": info.source_data_hash,
                "cubeline.selector_mode": str(mode),
            },
        )
        _log_metrics(ctx, {"pixels": info.pixel_count, "passes": info.passes}, prefix="phase1/")
        # Phase 1 alone on the validation frames, from the state itself: there whether Phase 1
        # ran in this flow run, came from the cache or is the champion's.
        _log_metrics(ctx, info.extra.get("val_metrics", {}), prefix="phase1/val/")
        _log_metrics(ctx, info.extra.get("init_quality", {}), prefix="phase1/")
        _log_metrics(
            ctx,
            {f"{m}/metrics_anomaly/ap": ap
             for m, ap in info.extra.get("selector_mode_val_ap", {}).items()},
            prefix="phase1/val_by_selector_mode/",
        )
        _log_artifact(ctx, state_path, "init_state")
        _log_artifact(ctx, state_path.with_suffix(".json"), "init_state")
    return PipelineRef(
        config_path=str(cfg),
        state_hash=state_hash,
        reused_state=reused,
        unfrozen=tuple(pipeline.unfrozen_node_names()),
        trainable_parameters=int(trainable),
    )


@task(name="gradient_train", version=STEP_VERSIONS["gradient_train"], persist_result=False)
def gradient_train(ctx: RunContext, data: DataRef, pipe: PipelineRef) -> TrainResult:
    """Phase 2 on Lightning, per-epoch metrics to the run through Lightning's MLflow logger.

    The best checkpoint is restored and the decision threshold calibrated on the validation
    frames (``params.yaml`` ``threshold``); the trained pipeline is saved and logged.
    """
    from lightning.pytorch.callbacks import ModelSummary

    from nodes.graph.pipeline import Pipeline
    from nodes.training.gradient_trainer import GradientTrainer
    from tasks.env import quiet_lightning

    quiet_lightning()

    p = ctx.params
    pipeline = Pipeline.load_from_file(pipe.config_path)
    dm = _dm(ctx, data)
    cfg = p.phase2.trainer
    updates: dict[str, Any] = {"default_root_dir": str(ctx.out / "lightning")}
    logger: Any = None
    if ctx.run_id is not None and ctx.tracking_uri is not None:
        from tasks.tracking import make_lightning_logger

        logger = make_lightning_logger(ctx.run_id, ctx.tracking_uri)
    elif cfg.callbacks.lr_monitor is not None:
        # Lightning's LearningRateMonitor refuses to run without a logger.
        updates["callbacks"] = cfg.callbacks.model_copy(update={"lr_monitor": None})
    trainer = GradientTrainer(
        pipeline,
        dm,
        loss_nodes=[pipeline.nodes["bce"]],  # type: ignore[list-item]
        metric_nodes=[pipeline.nodes["metrics_anomaly"]],  # type: ignore[list-item]
        trainer_config=cfg.model_copy(update=updates),
        optimizer_config=p.phase2.optimizer,
        scheduler_config=p.phase2.scheduler,
        seed=p.phase2.seed,
        logger=logger,
        # The layer table says nothing the run's params do not; keep orchestrated logs short.
        callbacks=[ModelSummary(max_depth=0)],
        threshold_method=p.threshold.method,
        target_fpr=p.threshold.target_fpr,
    )
    start = time.perf_counter()
    val = trainer.fit()
    seconds = time.perf_counter() - start
    cfg_path, weights_path = pipeline.save_to_file(ctx.out / "pipeline.yaml")
    _log_artifact(ctx, cfg_path, "pipeline")
    _log_artifact(ctx, weights_path, "pipeline")
    cal = trainer.calibration
    threshold = float(cal.threshold) if cal is not None else None
    epochs = int(trainer.trainer.current_epoch) if trainer.trainer is not None else 0
    _log_metrics(ctx, {"seconds": seconds, "epochs": epochs}, prefix="phase2/")
    report = trainer.report
    if report is not None:
        # Whether Phase 2 handed back its best epoch or fell back to the Phase-1 state.
        _log_metrics(ctx, {"kept_phase1": float(report.kept_phase1),
                           "phase1_val_score": report.phase1_score}, prefix="phase2/")
        set_run_tags(ctx, {"cubeline.phase2_outcome": report.outcome,
                        "cubeline.phase2_summary": report.summary()})
    if threshold is not None:
        _log_metrics(ctx, {"threshold_logit": threshold})
    return TrainResult(
        config_path=str(cfg_path),
        state_hash=pipe.state_hash,
        val_metrics={k: float(v) for k, v in val.items()},
        threshold=threshold,
        epochs=epochs,
        seconds=seconds,
    )


def score_split(pipeline: Pipeline, dm: CubeDataModule, split: str) -> tuple[Any, Any, Any]:
    """Scores (N, H, W), targets (N, H, W) and frame ids of a split, with metrics computed.

    Runs the pipeline once per batch in the ``test`` stage, so the metric nodes accumulate
    while the scores are collected.
    """
    import numpy as np
    import torch

    from nodes.library.metrics import AnomalyDetectionMetrics

    metric_nodes = [n for n in pipeline.node_list() if isinstance(n, AnomalyDetectionMetrics)]
    for m in metric_nodes:
        m.reset()
    scores: list[Any] = []
    targets: list[Any] = []
    ids: list[int] = []
    pipeline.eval()
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    with torch.no_grad():
        for batch in loader:
            out = pipeline.forward(batch, stage="test")
            scores.append(out[SCORE_KEY].detach().cpu().numpy())
            targets.append(batch["mask"].cpu().numpy())
            ids.extend(int(i) for i in batch["frame_id"])
    return np.concatenate(scores), np.concatenate(targets), ids


@task(name="evaluate", version=STEP_VERSIONS["evaluate"], persist_result=False)
def evaluate(ctx: RunContext, data: DataRef, trained: TrainResult) -> EvalResult:
    """Test metrics on the pinned evaluation split; ROC/PR curves, histograms, anomaly maps."""
    from nodes.graph.pipeline import Pipeline
    from nodes.library.metrics import AnomalyDetectionMetrics
    from tasks.registry import split_id_of
    from tasks.tracking import log_evaluation, write_evaluation_plots

    pipeline = Pipeline.load_from_file(trained.config_path)
    scores, targets, ids = score_split(pipeline, _dm(ctx, data), "test")
    metrics = {
        f"{m.name}/{k}": float(v)
        for m in pipeline.node_list()
        if isinstance(m, AnomalyDetectionMetrics)
        for k, v in m.compute().items()
    }
    names = [data.frame_names[i] for i in ids]
    split_id = split_id_of(tuple(data.frame_names[i] for i in data.test_ids), data.data_hash)
    out = ctx.out / "evaluation"
    label = "logit (score-to-logit head)"
    if ctx.run_id is not None:
        paths = log_evaluation(
            scores, targets, names, out, run_id=ctx.run_id, threshold=trained.threshold,
            score_label=label,
        )
    else:
        paths = write_evaluation_plots(
            scores, targets, names, out, threshold=trained.threshold, score_label=label
        )
    _log_metrics(ctx, metrics, prefix="test/")
    set_run_tags(ctx, {"cubeline.split_id": split_id})
    return EvalResult(
        metrics=metrics, split_id=split_id, artifacts={k: str(v) for k, v in paths.items()}
    )


@task(name="register_model", version=STEP_VERSIONS["register_model"], persist_result=False)
def register_model(
    ctx: RunContext,
    data: DataRef,
    trained: TrainResult,
    evaluation: EvalResult,
    phase1: str = "fitted",
    fp: str | None = None,
) -> RegistrationSummary:
    """Log the model (with signature), register a version, gate it, move the aliases.

    ``challenger`` always moves to the new version; ``champion`` only when the gate of
    ``params.yaml`` says so (inside a Prefect transaction, see :mod:`tasks.registry`). A
    champion never scored on this split is re-scored here on the same test frames first. The
    version carries ``fp`` (:func:`fingerprint`; computed here when not given) and the SHA-256
    of its files, and ``phase1`` goes into its one-line description.
    """
    import numpy as np

    from nodes.graph.pipeline import Pipeline
    from tasks.pyfunc_model import SHA256_METADATA, log_pipeline_model
    from tasks.registry import (
        TAG_FINGERPRINT,
        TAG_SHA256_PREFIX,
        THRESHOLD_METRIC,
        register_and_promote,
        version_metrics,
    )

    p = ctx.params
    _ensure_active_run(ctx)
    assert ctx.run_id is not None
    pipeline = Pipeline.load_from_file(trained.config_path)
    dm = _dm(ctx, data)
    example = dm.get_frame(data.test_ids[0]).cube[None].astype(np.float32)
    info = log_pipeline_model(
        pipeline,
        input_example=example,
        pipeline_name=p.pipeline.name,
        description=f"cubeline {p.pipeline.name}, data {data.data_hash}, init {trained.state_hash}",
    )

    def reevaluate(champion: Any, split_id: str) -> dict[str, float]:
        from nodes.library.metrics import AnomalyDetectionMetrics
        from tasks.serving import load_version

        # As data (YAML + weights_only, checked against the registered SHA-256), never as code.
        champ = load_version(p.registry.model_name, str(champion.version)).pipeline
        try:
            score_split(champ, dm, "test")
        except (RuntimeError, ValueError, CubelineError) as exc:
            # Another band count or pipeline: not comparable -- a recorded "keep" decision
            # (the champion has no finite score on this split), not a crash.
            log.warning("champion v%s cannot score this data (%s): not comparable",
                        champion.version, exc)
            return {p.registry.gate.metric: float("nan")}
        return {
            f"{m.name}/{k}": float(v)
            for m in champ.node_list()
            if isinstance(m, AnomalyDetectionMetrics)
            for k, v in m.compute().items()
        }

    result = register_and_promote(
        ctx.run_id,
        info.model_uri,
        {
            **evaluation.metrics,
            **({THRESHOLD_METRIC: trained.threshold} if trained.threshold is not None else {}),
        },
        evaluation.split_id,
        p.registry.gate,
        p.registry.model_name,
        reason_context=ctx.reason,
        reevaluate_champion=reevaluate,
        tags={
            TAG_FINGERPRINT: fp or fingerprint(ctx, data, trained.state_hash),
            # The registry pins the files it serves: tasks.serving checks them at every load.
            **{
                f"{TAG_SHA256_PREFIX}{k}": v
                for k, v in ((info.metadata or {}).get(SHA256_METADATA) or {}).items()
            },
        },
        description=(
            f"{ctx.reason}; data {data.data_hash[:12]} ({len(data.train_ids)} training frames), "
            f"Phase 1 {phase1}, test {p.registry.gate.metric} "
            f"{evaluation.metrics.get(p.registry.gate.metric, float('nan')):.4f}"
        ),
    )
    champion_metrics: dict[str, float] = {}
    if result.previous_champion_version is not None and not result.unchanged:
        prev = _client().get_model_version(result.model_name, result.previous_champion_version)
        champion_metrics = version_metrics(prev, evaluation.split_id) or {}
    return RegistrationSummary(
        model_name=result.model_name,
        version=result.version,
        alias=result.alias,
        promoted=result.decision.promote,
        reason=result.decision.reason,
        champion_version=result.champion_version,
        previous_champion_version=result.previous_champion_version,
        model_uri=info.model_uri,
        champion_metrics=champion_metrics,
        unchanged=result.unchanged,
    )


@task(name="emit_drift_event", version=STEP_VERSIONS["emit_drift_event"], persist_result=False)
def emit_drift_event(ctx: RunContext, data: DataRef, result: DriftResult) -> str | None:
    """Emit ``cubeline.drift.detected`` for a data version (a deployment trigger starts retrain).

    The payload names the data version (its DVC hash: the triggered run restores it by that
    hash alone), the drift decision and its criteria, the report and the champion compared with.

    Returns:
        The event id, or None when Prefect did not accept it.
    """
    from prefect.events import emit_event

    event = emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"cubeline.data.{data.data_hash}",
            "prefect.resource.name": f"data {data.data_hash[:12]}",
        },
        payload={
            "data_version": data.version or "",
            "data_hash": data.data_hash,
            "drift": result.summary,
            "reason": result.reason,
            "fired": list(result.fired),
            "champion_version": result.champion_version,
            "report": result.report_path,
            "flow_run_id": ctx.flow_run_id,
        },
    )
    return str(event.id) if event is not None else None


def fingerprint(ctx: RunContext, data: DataRef, state_hash: str) -> str:
    """What fixes a trained model: data, its split, params, Phase-1 state and code."""
    from tasks.tracking import code_version

    return _digest(
        data.data_hash,
        json.dumps(data.split_names, sort_keys=True),
        data.annotation is not None,
        ctx.params.section_hash(),
        state_hash,
        code_version(Path(ctx.root)),
    )


@task(name="find_unchanged", version=STEP_VERSIONS["find_unchanged"], persist_result=False)
def find_unchanged(ctx: RunContext, fp: str) -> str | None:
    """The registered version with :func:`fingerprint` ``fp`` (same data, params, state, code).

    Phase 2 is seeded, so such a run would reproduce that version: the flow then registers
    nothing and says ``unchanged: version N`` (``retrain.skip_unchanged``).
    """
    from tasks.registry import TAG_FINGERPRINT, find_versions_by_tag

    set_run_tags(ctx, {TAG_FINGERPRINT: fp})
    if not ctx.params.retrain.skip_unchanged:
        return None
    versions = find_versions_by_tag(ctx.params.registry.model_name, TAG_FINGERPRINT, fp)
    return versions[0] if versions else None


# --------------------------------------------------------------------------------------------
# Plain functions behind `cubeline predict` and `cubeline phase1` (no flow run needed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """What ``predict_cubes`` wrote, and which registered version scored.

    Attributes:
        model_uri: ``models:/<name>/<version>``.
        version: The version that scored.
        files: Files written.
    """

    model_uri: str
    version: str
    files: list[Path]


def predict_cubes(
    params_path: str | Path, paths: Sequence[str | Path], out_dir: Path, alias: str = "champion"
) -> Prediction:
    """Score frames with ``models:/<registry.model_name>@<alias>``; write anomaly maps.

    For every frame: ``<file>_<index>.scores.npy`` (float32 RX scores), ``.decisions.npy``
    (bool, the calibrated decider) and ``anomaly_map_<file>_<index>.png``.

    Args:
        params_path: ``params.yaml`` (model name, tracking store, expected band count).
        paths: Frame files (``.mat``, ``.npz``, ``.cu3s``).
        out_dir: Output directory (created).
        alias: Registry alias to load.

    Returns:
        The version that scored and the files written.

    Raises:
        DataValidationError: A frame fails validation (nothing is written for any frame).
        RegistryError: The model has no such alias.
    """
    import io

    import numpy as np

    from nodes.data.readers import read_frames
    from tasks.env import atomic_write_bytes
    from tasks.pyfunc_model import score_cubes
    from tasks.serving import load_alias
    from tasks.tracking import configure_mlflow, write_anomaly_maps

    params = load_params(params_path)
    root = repo_root(Path(params_path).resolve().parent)
    # Validate every frame before writing anything.
    frames = [
        fr
        for p in paths
        for fr in read_frames(p, validate=True, expected_channels=params.data.expected_channels)
    ]
    configure_mlflow(params.mlflow.tracking_uri, root, experiment_name=params.mlflow.experiment)
    model = load_alias(params.registry.model_name, alias)
    decider = next((n for n in model.pipeline.node_list() if n.name == "decider"), None)
    threshold = getattr(decider, "threshold", None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fr in frames:
        name = f"{Path(fr.source).stem}_{fr.index}"
        pred = score_cubes(model.pipeline, fr.cube[None].astype(np.float32), model.outputs)
        scores = np.asarray(pred["scores"], dtype=np.float32)
        decisions = np.asarray(pred["decisions"])
        for key, arr in (("scores", scores), ("decisions", decisions)):
            buf = io.BytesIO()
            np.save(buf, arr[0], allow_pickle=False)
            # Through a temporary file and a rename: a link planted at the path is replaced,
            # not followed.
            written.append(atomic_write_bytes(out_dir / f"{name}.{key}.npy", buf.getvalue()))
        targets = fr.mask[None] if fr.labelled else None
        maps = write_anomaly_maps(
            scores,
            [name],
            out_dir,
            targets=targets,
            decisions=decisions,
            score_label="RX score (Mahalanobis², raw)",
            title_suffix=f"{model.uri}" + (f", threshold {float(threshold):.3g} logit"
                                           if threshold is not None else ""),
        )
        written.extend(maps.values())
    return Prediction(model.uri, model.version, written)


def phase1_report(params_path: str | Path) -> dict[str, Any]:
    """Fit Phase 1 on the training frames; per-frame AUC/AP of the RX scores of every frame.

    Returns:
        ``{"seconds", "pixels", "passes", "setup_seconds", "frames": [{"frame", "split",
        "anomaly_px", "auroc", "ap"}, ...]}``.
    """
    import numpy as np
    import torch

    from nodes.data.datamodule import CubeDataModule
    from nodes.training.statistical_trainer import StatisticalTrainer
    from tasks.tracking import average_precision, roc_curve
    from tasks.versioning import ensure_data

    params = load_params(params_path)
    d = params.data
    ensure_data(repo_root(Path(params_path).resolve().parent), d.dvc_file, params.dvc.remote)
    files = [resolve_path(params_path, p) for p in d.paths]
    start = time.perf_counter()
    dm = CubeDataModule(
        files,
        d.train_ids,
        d.val_ids,
        d.test_ids,
        batch_size=d.batch_size,
        expected_channels=d.expected_channels,
    )
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    mode = params.pipeline.selector_mode
    pipeline = build_pipeline(params, dm.num_channels, "soft" if mode == "auto" else mode)
    report = StatisticalTrainer(
        pipeline,
        dm,
        normal_only=params.phase1.normal_only,
        sample_fraction=params.phase1.sample_fraction,
        seed=params.phase1.seed,
    ).fit()
    split_of = {
        i: s
        for s, ids in (("test", d.test_ids), ("val", d.val_ids), ("train", d.train_ids))
        for i in ids
    }
    rows = []
    pipeline.eval()
    with torch.no_grad():
        for fid in sorted(split_of):
            fr = dm.get_frame(fid)
            out = pipeline.forward(
                {"cube": torch.from_numpy(np.ascontiguousarray(fr.cube[None]))},
                stage="inference",
                outputs=["rx.scores"],
            )
            s = out["rx.scores"][0].double().numpy()
            _, _, auc = roc_curve(s, fr.mask)
            rows.append(
                {
                    "frame": Path(fr.source).name,
                    "split": split_of[fid],
                    "anomaly_px": int(fr.mask.sum()),
                    "auroc": auc,
                    "ap": average_precision(s, fr.mask),
                }
            )
    return {
        "seconds": report.seconds,
        "pixels": report.pixels,
        "passes": report.passes,
        "setup_seconds": setup_s,
        "frames": rows,
    }
