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

import difflib
import os
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nodes.errors import ConfigError

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
# error formatting
# --------------------------------------------------------------------------------------------


def _unwrap_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """Return the config model inside an annotation and whether it sits in a sequence.

    Handles ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``Sequence[X]`` and ``Annotated[X, ...]``;
    anything else resolves to ``(None, False)``.
    """
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap_model(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(annotation):
            model, seq = _unwrap_model(arg)
            if model is not None:
                return model, seq
        return None, False
    if origin in (list, tuple, Sequence):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if len(args) == 1:
            model, _ = _unwrap_model(args[0])
            return model, True
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Walk ``loc`` (a pydantic error location) from ``root`` to the model that owns its tail."""
    model: type[BaseModel] | None = root
    expect_index = False
    for part in loc:
        if model is None:
            return None
        if expect_index:
            if not isinstance(part, int):
                return None
            expect_index = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model, expect_index = _unwrap_model(field.annotation)
    return model if not expect_index else None


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe_error(root: type[BaseModel], err: Any) -> str:
    loc: tuple[int | str, ...] = tuple(err.get("loc", ()))
    path = _dotted(loc) if loc else root.__name__
    kind = err.get("type", "")
    if kind == "extra_forbidden" and loc:
        owner = _model_at(root, loc[:-1])
        name = str(loc[-1])
        if owner is not None:
            valid = list(owner.model_fields)
            hint = difflib.get_close_matches(name, valid, n=1)
            did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
            return (
                f"{path}: unknown field '{name}'.{did_you_mean} Valid fields of "
                f"{owner.__name__}: {', '.join(valid)}."
            )
        return f"{path}: unknown field '{name}'."
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in err and kind not in ("missing",) and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{path}: {msg}"


def _config_error(
    cls: type[BaseModel],
    exc: ValidationError,
    *,
    source: str | os.PathLike[str] | None = None,
    section: str | None = None,
) -> ConfigError:
    where = f" in {os.fspath(source)}" if source is not None else ""
    if section:
        where += f" (section '{section}')"
    lines = [_describe_error(cls, err) for err in exc.errors()]
    body = "\n".join(f"  - {line}" for line in lines)
    return ConfigError(
        f"Invalid {cls.__name__}{where}: {len(lines)} problem(s):\n{body}\n"
        "Fix or remove the fields named above."
    )


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------


class ConfigModel(BaseModel):
    """Common base: frozen, unknown fields rejected, dict/YAML round trip, ConfigError on failure.

    ``from_dict(cfg.to_dict()) == cfg`` and ``from_yaml`` of a ``to_yaml`` file give an equal
    config back.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(type(self), exc) from None

    # Marks this __init__ as pydantic's own (as RootModel does), so nested configs are validated
    # by pydantic-core without calling it: errors then keep their full dotted path and all of
    # them are reported together, instead of the first nested one escaping as a ConfigError.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        raise ConfigError(
            f"{type(self).__name__} is frozen: cannot set '{name}'. Build a changed copy with "
            f"cfg.replace({name}=...)."
        )

    def __delattr__(self, name: str) -> None:
        raise ConfigError(f"{type(self).__name__} is frozen: cannot delete '{name}'.")

    def replace(self, **changes: Any) -> Self:
        """Return a validated copy with ``changes`` applied (like ``dataclasses.replace``).

        Raises:
            ConfigError: When the changed config is invalid.
        """
        data = self.to_dict()
        for key, value in changes.items():
            data[key] = value.to_dict() if isinstance(value, ConfigModel) else value
        return type(self).from_dict(data)

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any] | None,
        *,
        source: str | os.PathLike[str] | None = None,
        section: str | None = None,
    ) -> Self:
        """Validate a plain mapping (e.g. a ``params.yaml`` section) into this config.

        Args:
            data: The mapping; ``None`` (an empty YAML section) means all defaults.
            source: File the mapping came from, named in error messages.
            section: Section of ``source`` the mapping came from, named in error messages.

        Raises:
            ConfigError: When a field is unknown, missing or invalid.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            where = f" in {os.fspath(source)}" if source is not None else ""
            raise ConfigError(
                f"{cls.__name__}{where} must be a mapping of field names to values, got "
                f"{type(data).__name__}. Valid fields: {', '.join(cls.model_fields)}."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _config_error(cls, exc, source=source, section=section) from None

    def to_dict(self) -> dict[str, Any]:
        """Return plain Python data (dicts, lists, str, numbers, bool, None) safe for YAML/JSON."""
        return self.model_dump(mode="json")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, section: str | None = None) -> Self:
        """Read this config from a YAML file, optionally from a (dotted) section of it.

        Args:
            path: The YAML file.
            section: Dotted key of the sub-mapping to read (``"train.gradient"``); ``None``
                reads the whole document.

        Raises:
            ConfigError: When the file is missing or not YAML, the section is absent, or the
                content does not validate.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"Config file {p} does not exist; pass the path of an existing YAML file."
            ) from None
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {p}: {exc}.") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {p} is not valid YAML: {exc}") from None
        if section:
            node: Any = doc
            walked: list[str] = []
            for key in section.split("."):
                if not isinstance(node, dict) or key not in node:
                    have = ", ".join(map(str, node)) if isinstance(node, dict) else "(no mapping)"
                    at = ".".join(walked) or "top level"
                    raise ConfigError(
                        f"Config file {p} has no section '{section}' (missing key '{key}' at "
                        f"{at}; keys there: {have})."
                    )
                node = node[key]
                walked.append(key)
            doc = node
        return cls.from_dict(doc, source=p, section=section)

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        """Write this config as YAML, atomically (a failed write leaves no partial file).

        Returns:
            The path written.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p


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
