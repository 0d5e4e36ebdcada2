"""``params.yaml``: every knob of the flows, loaded into frozen typed configs.

One section per flow/step (Kedro's habit); each model forbids unknown keys, so a misspelt knob
fails when the file is read, with a message naming the dotted field, ``params.yaml`` and the
section. Phase 2 reuses :class:`nodes.training.config.TrainingConfig` as is.

:func:`section_hash` gives a stable digest of one section's *validated* content (defaults filled
in, keys sorted): the task cache keys use it, so editing a comment or reordering keys does not
invalidate a cache, while changing a value re-runs exactly the steps that read that section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

from nodes.errors import ConfigError
from nodes.training.config import ConfigModel, TrainingConfig
from tasks.registry import GateConfig
from tasks.sharding import ShardingConfig

PARAMS_FILE = "params.yaml"

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
FrameIds = tuple[Annotated[int, Field(ge=0)], ...]


class DataParams(ConfigModel):
    """Frames and splits (ids index the frames of ``paths`` in order)."""

    paths: tuple[str, ...] = Field(min_length=1)
    train_ids: FrameIds = Field(min_length=1)
    val_ids: FrameIds = Field(min_length=1)
    test_ids: FrameIds = Field(min_length=1)
    batch_size: Annotated[int, Field(ge=1)] = 1
    annotation_path: str | None = None
    expected_channels: Annotated[int, Field(ge=1)] | None = None
    dvc_file: str = "data.dvc"

    @model_validator(mode="after")
    def _test_frames_are_held_out(self) -> DataParams:
        # The gate decides on the test frames: a model must never have trained or calibrated on
        # them. (Train and val may share frames; the datamodule warns about that.)
        for name, ids in (("train_ids", self.train_ids), ("val_ids", self.val_ids)):
            shared = sorted(set(ids) & set(self.test_ids))
            if shared:
                raise ValueError(
                    f"frames {shared} are in both {name} and test_ids; the promotion gate decides "
                    "on the test frames, so they must be held out: remove them from one side"
                )
        return self


class PipelineParams(ConfigModel):
    """The guide's pipeline (:func:`~nodes.library.presets.build_channel_selector_pipeline`)."""

    name: str = "Channel_Selector"
    n_select: Annotated[int, Field(ge=1)] = 10
    eps: PositiveFloat = 1e-6
    temperature_init: PositiveFloat = 5.0
    bce_weight: PositiveFloat = 10.0
    normal_class_ids: tuple[int, ...] = (0,)
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    unfreeze: tuple[str, ...] = ("selector", "rx", "logit_head")
    selector_mode: Literal["hard", "soft", "auto"] = "hard"


class Phase1Params(ConfigModel):
    """Statistical initialization (:class:`nodes.StatisticalTrainer`)."""

    normal_only: bool = True
    sample_fraction: Fraction | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)
    init_check: Literal["log", "warn", "refuse", "off"] = "log"
    #: Statistics that cannot give a detector (zero-variance bands, singular covariance,
    #: non-finite scores): refuse the run, or repair by adding ``ridge`` (relative to the mean
    #: band variance) to the covariance's diagonal -- a stated, logged change.
    degenerate: Literal["refuse", "ridge"] = "refuse"
    ridge: PositiveFloat = 1e-3


class ThresholdParams(ConfigModel):
    """Decision-threshold calibration on the validation frames (:mod:`nodes.training.threshold`)."""

    method: Literal["auto", "fpr", "max_f1"] = "fpr"
    target_fpr: Annotated[float, Field(gt=0, lt=1)] = 0.01


class DriftParams(ConfigModel):
    """Drift thresholds (:class:`~nodes.training.drift.DriftThresholds`), what drift_watch reads."""

    ridge: PositiveFloat = 1e-2
    mean_shift: PositiveFloat = 1.5
    cov_divergence: PositiveFloat = 0.3
    band_smd: PositiveFloat = 1.0
    band_log_var_ratio: PositiveFloat = 0.693
    band_fraction: Fraction = 0.1
    min_criteria: Annotated[int, Field(ge=1, le=3)] = 1

    def thresholds(self) -> Any:
        """The :class:`nodes.training.drift.DriftThresholds` of this section."""
        from nodes.training.drift import DriftThresholds

        return DriftThresholds(**self.model_dump())


class IngestParams(ConfigModel):
    """How new frames become data versions (``cubeline ingest``, the drift watch's inbox)."""

    inbox: str = "inbox"
    labels: str = "labels.json"
    val_frames: Annotated[int, Field(ge=1)] = 1
    test_frames: Annotated[int, Field(ge=1)] = 1


class RetrainParams(ConfigModel):
    """What a drift-triggered retrain trains on, and when a run registers nothing."""

    on_drift_data: Literal["new", "old_and_new"] = "new"
    skip_unchanged: bool = True


#: What the flows' metric node (``metrics_anomaly``,
#: :class:`nodes.library.metrics.AnomalyDetectionMetrics`)
#: reports on the test frames: the only figures the gate can read (checked before any training).
GATE_METRICS: tuple[str, ...] = tuple(
    f"metrics_anomaly/{k}" for k in ("iou", "f1", "precision", "recall", "ap", "auroc")
)


class RegistryParams(ConfigModel):
    """MLflow model registry."""

    model_name: str = Field(default="cubeline-channel-selector", min_length=1, max_length=256)
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _gate_reads_reported_metrics(self) -> RegistryParams:
        import difflib

        bad = sorted(set(self.model_name) & set("/:%"))
        if bad or self.model_name != self.model_name.strip():
            raise ValueError(
                f"registry.model_name {self.model_name!r} is not a valid MLflow model name "
                f"(no '/', ':', '%', no leading/trailing blanks; found {bad or 'blanks'}): "
                "e.g. cubeline-channel-selector"
            )
        g = self.gate
        for key in (g.metric, *g.absolute_thresholds, *g.absolute_maximums):
            if key not in GATE_METRICS:
                near = difflib.get_close_matches(key, GATE_METRICS, n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise ValueError(
                    f"gate metric {key!r} is not reported by the flows.{hint} Use one of "
                    f"{', '.join(GATE_METRICS)}"
                )
        return self


class MlflowParams(ConfigModel):
    """MLflow tracking.

    ``tracking_uri: null`` means ``sqlite:///<repo>/mlflow.db`` with artifacts in
    ``<repo>/mlartifacts``.
    """

    tracking_uri: str | None = None
    experiment: str = Field(default="cubeline", min_length=1)


class ScheduleParams(ConfigModel):
    """Deployments served by ``cubeline serve``."""

    retrain_cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    drift_watch_interval_s: Annotated[int, Field(ge=10)] = 3600

    @model_validator(mode="after")
    def _cron_has_five_fields(self) -> ScheduleParams:
        if len(self.retrain_cron.split()) != 5:
            raise ValueError(
                f"retrain_cron {self.retrain_cron!r} needs 5 fields (minute hour day month "
                "weekday), e.g. '0 3 * * 1'"
            )
        return self


class DvcParams(ConfigModel):
    """DVC remote and where initialization states are checked out."""

    remote: str | None = "local"
    states_dir: str = "outputs/states"
    versions_dir: str = "outputs/data_versions"


class Params(ConfigModel):
    """The whole ``params.yaml``."""

    data: DataParams
    pipeline: PipelineParams = Field(default_factory=PipelineParams)
    phase1: Phase1Params = Field(default_factory=Phase1Params)
    phase2: TrainingConfig = Field(default_factory=TrainingConfig)
    threshold: ThresholdParams = Field(default_factory=ThresholdParams)
    drift: DriftParams = Field(default_factory=DriftParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    retrain: RetrainParams = Field(default_factory=RetrainParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    schedule: ScheduleParams = Field(default_factory=ScheduleParams)
    dvc: DvcParams = Field(default_factory=DvcParams)

    @model_validator(mode="after")
    def _node_args_fit_the_data(self) -> Params:
        # What the nodes would refuse only once built (after server start-up), checked here.
        channels = self.data.expected_channels
        if channels is not None and self.pipeline.n_select > channels:
            raise ValueError(
                f"pipeline.n_select is {self.pipeline.n_select} but the frames have "
                f"data.expected_channels={channels} bands: choose 1..{channels}"
            )
        return self

    def section_hash(self, *names: str) -> str:
        """Stable digest of the named sections (all of them when none is named).

        Args:
            names: Section names, e.g. ``"data", "phase1"``.

        Returns:
            16 hex digits of the SHA-256 of the sections' canonical JSON.
        """
        fields = type(self).model_fields
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise ConfigError(
                f"unknown params.yaml section(s) {unknown}; sections are {list(fields)}"
            )
        chosen = names or tuple(fields)
        doc = {n: getattr(self, n).to_dict() for n in sorted(chosen)}
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_params(path: str | Path) -> Params:
    """Read and validate ``params.yaml``.

    Args:
        path: The file (or a directory holding ``params.yaml``).

    Returns:
        The frozen, validated parameters.

    Raises:
        ConfigError: File missing, not YAML, not a mapping, or a field invalid (the message names
            the dotted field, the file and the section).
    """
    p = Path(path)
    if p.is_dir():
        p = p / PARAMS_FILE
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{p} does not exist; run from the cubeline repository root or pass --params"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 YAML"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}; check the path and its "
                          "permissions") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p} must be a mapping of sections (data, pipeline, phase1, ...)")
    if "data" not in doc:
        raise ConfigError(f"{p} has no 'data' section; it names the frames and the splits")
    return Params.from_dict(doc, source=p)


def resolve_path(params_path: str | Path, path: str | Path) -> Path:
    """Resolve a path of ``params.yaml`` against the file's directory."""
    p = Path(path)
    if p.is_absolute():
        return p
    base = Path(params_path)
    base = base if base.is_dir() else base.parent
    return (base / p).resolve()
