"""What steps share: their versions and the small typed values they take and return.

Tasks take and return small typed values -- paths, DVC hashes, run ids, metric dicts -- never
tensors. Every task reads ``params.yaml`` itself through :class:`RunContext`, so its inputs are
explicit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.params import Params, load_params

if TYPE_CHECKING:

    pass



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
