"""Typed, frozen configuration of Phase-2 (gradient) training.

The model names and fields follow the public two-phase training guide (``TrainingConfig``,
``OptimizerConfig``, ``SchedulerConfig``, ``TrainerConfig``, ``CallbacksConfig``,
``ModelCheckpointConfig``, ``EarlyStoppingConfig``, ``LearningRateMonitorConfig``); every field
maps 1:1 onto a torch optimizer / scheduler argument or a Lightning ``Trainer`` / callback argument
(see :mod:`nodes.training.optim`).

All models are pydantic v2 models with ``extra="forbid"`` and ``frozen=True``: a misspelt key in
``params.yaml`` (``montor``) fails when the file is read, before any data is touched, and a loaded
config cannot drift while a run uses it. pydantic's ``ValidationError`` never escapes: it is turned
into :class:`nodes.errors.ConfigError` whose message names the dotted field path, the file (when
loaded from YAML), the valid fields and the closest match of a misspelt one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from nodes.training.config_model import ConfigModel

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULER_NAMES",
    "CallbacksConfig",
    "ConfigModel",
    "EarlyStoppingConfig",
    "LearningRateMonitorConfig",
    "ModelCheckpointConfig",
    "OptimizerConfig",
    "ParamGroupConfig",
    "SchedulerConfig",
    "TrainerConfig",
    "TrainingConfig",
    "monitor_entries",
]

OptimizerName = Literal["adamw", "adam", "sgd"]
SchedulerName = Literal["reduce_on_plateau", "cosine", "step"]
Mode = Literal["min", "max"]
Precision = Literal["64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]

OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)

# Lightning's own reading of its legacy precision values; normalising here keeps one spelling in
# saved configs, so two configs that train identically also compare equal.
_PRECISION_ALIASES: dict[str, str] = {"64": "64-true", "32": "32-true", "16": "16-mixed"}
_PRECISION_ALIASES["bf16"] = "bf16-mixed"

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def _normalise_name(value: Any) -> Any:
    """Accept ``AdamW`` / ``reduce-on-plateau`` for the canonical lower snake-case names."""
    if isinstance(value, str):
        return value.strip().lower().replace("-", "_")
    return value


# --------------------------------------------------------------------------------------------
# optimizer / scheduler
# --------------------------------------------------------------------------------------------


class ParamGroupConfig(ConfigModel):
    """Optimizer settings for the parameters of some nodes (a torch parameter group).

    Nodes are named as in the pipeline (``rx``, ``logit_head``, ...); a field left ``None``
    takes the optimizer's value.

    ``relative_lr`` makes the step size relative to each parameter's magnitude when the
    optimizer is built: ``lr * RMS(p)`` (``lr`` itself for a parameter that is all zeros),
    after Adafactor's relative step (Shazeer & Stern 2018). Adam-type optimizers move every
    entry by about ``lr`` per step whatever its scale, so without it a covariance factor with
    entries of 1e-3 and a logit scale of 1e-2 change by a large fraction per step at a rate
    that barely moves a bias.
    """

    nodes: Sequence[str]
    lr: PositiveFloat | None = None
    weight_decay: NonNegativeFloat | None = None
    relative_lr: bool = False

    @field_validator("nodes")
    @classmethod
    def _some_nodes(cls, value: Sequence[str]) -> tuple[str, ...]:
        names = tuple(value)
        if not names:
            raise ValueError("a parameter group needs at least one node name")
        if len(set(names)) != len(names):
            raise ValueError(f"node names repeat within the group: {list(names)}")
        return names


class OptimizerConfig(ConfigModel):
    """Optimizer: ``adamw`` (default), ``adam`` or ``sgd`` (which alone takes ``momentum``).

    ``weight_decay`` defaults to 0 for every optimizer (torch's AdamW would default to 0.01) so
    that the config, not the optimizer class, decides the regularisation.

    ``param_groups`` give chosen nodes their own learning rate or weight decay (per-node
    learning rates): the parameters of nodes named in no group use ``lr`` and ``weight_decay``.
    A node may appear in one group only.
    """

    name: OptimizerName = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    param_groups: Sequence[ParamGroupConfig] = ()

    @field_validator("param_groups", mode="before")
    @classmethod
    def _groups_none(cls, value: Any) -> Any:
        return () if value is None else value

    @field_validator("param_groups")
    @classmethod
    def _groups_disjoint(cls, value: Sequence[ParamGroupConfig]) -> tuple[ParamGroupConfig, ...]:
        seen: set[str] = set()
        for group in value:
            twice = seen.intersection(group.nodes)
            if twice:
                raise ValueError(f"node(s) {sorted(twice)} appear in more than one parameter group")
            seen.update(group.nodes)
        return tuple(value)

    def node_settings(self, node: str) -> tuple[float, float]:
        """``(lr, weight_decay)`` for the parameters of ``node``."""
        for group in self.param_groups:
            if node in group.nodes:
                lr = group.lr if group.lr is not None else self.lr
                wd = group.weight_decay if group.weight_decay is not None else self.weight_decay
                return lr, wd
        return self.lr, self.weight_decay

    @field_validator("name", mode="before")
    @classmethod
    def _canonical_name(cls, value: Any) -> Any:
        return _normalise_name(value)

    @model_validator(mode="after")
    def _momentum_only_for_sgd(self) -> Self:
        if self.momentum and self.name != "sgd":
            raise ValueError(
                f"momentum={self.momentum} is only used by 'sgd'; remove it or set name: sgd"
            )
        return self


class SchedulerConfig(ConfigModel):
    """Learning-rate scheduler: ``reduce_on_plateau`` (default), ``cosine`` or ``step``.

    Fields of the schedulers not chosen are kept but unused. ``cosine`` with ``t_max=None``
    anneals over the trainer's ``max_epochs`` (or steps with ``interval="step"``).
    """

    name: SchedulerName = "reduce_on_plateau"
    monitor: str | None = None
    mode: Mode = "min"
    factor: Annotated[float, Field(gt=0, lt=1)] = 0.1
    patience: NonNegativeInt = 10
    min_lr: NonNegativeFloat = 0.0
    t_max: PositiveInt | None = None
    eta_min: NonNegativeFloat = 0.0
    step_size: PositiveInt = 10
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    interval: Literal["epoch", "step"] = "epoch"
    frequency: PositiveInt = 1

    @field_validator("name", mode="before")
    @classmethod
    def _canonical_name(cls, value: Any) -> Any:
        return _normalise_name(value)

    @model_validator(mode="after")
    def _plateau_needs_monitor(self) -> Self:
        if self.name == "reduce_on_plateau" and not self.monitor:
            raise ValueError(
                "reduce_on_plateau needs 'monitor', the logged metric it watches "
                "(e.g. monitor: metrics_anomaly/iou with mode: max)"
            )
        return self


# --------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------


class ModelCheckpointConfig(ConfigModel):
    """Lightning ``ModelCheckpoint``. ``monitor=None`` keeps the latest checkpoint(s) only."""

    monitor: str | None = None
    mode: Mode = "min"
    save_top_k: Annotated[int, Field(ge=-1)] = 1
    filename: str | None = None
    dirpath: str | None = None
    save_last: bool = False

    @model_validator(mode="after")
    def _top_k_needs_monitor(self) -> Self:
        # Lightning refuses this only once training starts; say it at load time instead.
        if self.monitor is None and self.save_top_k not in (-1, 0, 1):
            raise ValueError(
                f"save_top_k={self.save_top_k} ranks checkpoints and so needs 'monitor'; "
                "set monitor or use save_top_k 1 (latest) / -1 (all)"
            )
        return self


class EarlyStoppingConfig(ConfigModel):
    """Lightning ``EarlyStopping``."""

    monitor: str
    mode: Mode = "min"
    patience: NonNegativeInt = 3
    min_delta: NonNegativeFloat = 0.0
    check_finite: bool = True


class LearningRateMonitorConfig(ConfigModel):
    """Lightning ``LearningRateMonitor``."""

    logging_interval: Literal["step", "epoch"] | None = "epoch"
    log_momentum: bool = False


class CallbacksConfig(ConfigModel):
    """Callbacks of the gradient trainer: one checkpoint, any number of early stops, LR monitor."""

    checkpoint: ModelCheckpointConfig | None = None
    # Sequence so lists type-check as in the guide; stored as a tuple to stay immutable.
    early_stopping: Sequence[EarlyStoppingConfig] = ()
    lr_monitor: LearningRateMonitorConfig | None = None

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _single_to_list(cls, value: Any) -> Any:
        # A lone mapping is a common YAML slip for a one-element list; accept it.
        if value is None:
            return ()
        if isinstance(value, dict | EarlyStoppingConfig):
            return (value,)
        return value

    @field_validator("early_stopping")
    @classmethod
    def _as_tuple(cls, value: Sequence[EarlyStoppingConfig]) -> tuple[EarlyStoppingConfig, ...]:
        return tuple(value)


# --------------------------------------------------------------------------------------------
# trainer / training
# --------------------------------------------------------------------------------------------


class TrainerConfig(ConfigModel):
    """Arguments of the Lightning ``Trainer`` (:func:`~nodes.training.optim.build_trainer_kwargs`).

    Defaults differ from Lightning's where our runs need it: ``log_every_n_steps=1`` because a
    session has a handful of frames (few batches per epoch). Lightning's progress bar is on, as
    in Lightning; orchestrated runs whose logs go to files turn it off in ``params.yaml``.
    ``strategy`` is Lightning's (``"ddp"`` with ``devices: 2`` trains on two GPUs).
    """

    max_epochs: PositiveInt = 100
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: int | str | Sequence[int] = "auto"
    strategy: str = "auto"
    precision: Precision = "32-true"
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)
    log_every_n_steps: PositiveInt = 1
    check_val_every_n_epoch: PositiveInt = 1
    accumulate_grad_batches: PositiveInt = 1
    gradient_clip_val: NonNegativeFloat | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    enable_progress_bar: bool = True
    default_root_dir: str | None = None
    deterministic: bool = False

    @field_validator("accelerator", mode="before")
    @classmethod
    def _lower_accelerator(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("precision", mode="before")
    @classmethod
    def _normalise_precision(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            value = value.strip().lower()
            return _PRECISION_ALIASES.get(value, value)
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: int | str | Sequence[int]) -> int | str | tuple[int, ...]:
        if not isinstance(value, int | str):
            value = tuple(value)
        if isinstance(value, bool):
            raise ValueError("devices must be 'auto', a count, -1 (all) or a list of indices")
        if isinstance(value, int):
            if value == 0 or value < -1:
                raise ValueError("devices must be a positive count, -1 (all) or 'auto'")
        elif isinstance(value, tuple):
            if not value or any(i < 0 for i in value):
                raise ValueError("devices as a list needs one or more device indices >= 0")
        elif value != "auto" and not all(
            part.strip().lstrip("-").isdigit() for part in value.split(",") if part.strip()
        ):
            raise ValueError("devices must be 'auto', a count, -1, a list or '0,1'")
        return value


class TrainingConfig(ConfigModel):
    """Everything a Phase-2 run needs: seed, optimizer, optional scheduler, trainer.

    Also rejects one metric monitored with opposite modes (e.g. the scheduler maximising
    ``metrics_anomaly/iou`` while the checkpoint minimises it), which is always a slip.
    """

    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = None
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="after")
    def _consistent_modes(self) -> Self:
        seen: dict[str, tuple[str, str]] = {}
        for key, mode, where in monitor_entries(self):
            if key in seen and seen[key][0] != mode:
                other_mode, other_where = seen[key]
                raise ValueError(
                    f"metric '{key}' is monitored with mode '{other_mode}' by {other_where} but "
                    f"'{mode}' by {where}; use the same mode for the same metric"
                )
            seen.setdefault(key, (mode, where))
        return self


def monitor_entries(cfg: TrainingConfig) -> list[tuple[str, str, str]]:
    """Return ``(metric key, mode, config path)`` for every monitor the config actually uses."""
    out: list[tuple[str, str, str]] = []
    sched = cfg.scheduler
    if sched is not None and sched.name == "reduce_on_plateau" and sched.monitor:
        out.append((sched.monitor, sched.mode, "scheduler"))
    cbs = cfg.trainer.callbacks
    if cbs.checkpoint is not None and cbs.checkpoint.monitor:
        out.append((cbs.checkpoint.monitor, cbs.checkpoint.mode, "trainer.callbacks.checkpoint"))
    for i, es in enumerate(cbs.early_stopping):
        out.append((es.monitor, es.mode, f"trainer.callbacks.early_stopping[{i}]"))
    return out
