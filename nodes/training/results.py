"""Metric results and metric keys of the two trainers, in the reference guide's forms too.

Phase 2 logs losses and metrics per stage: ``train/<loss>``, ``val/<loss>``,
``val/<metric node>/<metric>`` and ``test/...``. Earlier releases logged metric-node results
without the stage (``metrics_anomaly/iou``), and the guide monitors both forms; bare metric names
in a monitor, a checkpoint filename or a result lookup are still accepted and mapped to the
``val/`` key, with a :class:`FutureWarning` (deprecated, to be removed in a later release).

Results are plain ``dict[str, float]`` subclasses (:class:`Results`), so code that iterates them
sees flat keys only; the guide's ``results["metrics"]`` (objects with ``.name`` and ``.value``)
and bare-name lookups are answered on demand.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from nodes.errors import ConfigError, TrainingError
from nodes.training.config import (
    CallbacksConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    TrainingConfig,
)

STAGE_PREFIXES: tuple[str, ...] = ("val/", "test/", "train/")
#: Checkpoint filename fields Lightning always fills.
_ALWAYS_KNOWN = frozenset({"epoch", "step"})
_FIELD = re.compile(r"\{([^{}:]+)(?::[^{}]*)?\}")


class MetricValue(NamedTuple):
    """One metric as the guide iterates them: ``for m in results["metrics"]: m.name, m.value``."""

    name: str
    value: float


class Results(dict[str, float]):
    """Flat ``{key: value}`` results that also answer the guide's lookups.

    ``results["metrics"]`` is the list of :class:`MetricValue` (not a key of the dict); a bare
    metric name (``"metrics_anomaly/iou"``) finds its stage-prefixed key with a deprecation
    warning, and a ``"val/..."`` name finds the bare key of Phase-1 results.
    """

    @property
    def metrics(self) -> list[MetricValue]:
        """Every result as a :class:`MetricValue`, in key order."""
        return [MetricValue(k, float(v)) for k, v in self.items()]

    def __missing__(self, key: str) -> Any:
        if key == "metrics":
            return self.metrics
        for prefix in STAGE_PREFIXES:
            if key.startswith(prefix) and key.removeprefix(prefix) in self:
                return self[key.removeprefix(prefix)]
        hits = [p + key for p in STAGE_PREFIXES if p + key in self]
        if len(hits) == 1:
            warnings.warn(
                f"metric key {key!r} is deprecated: Phase 2 reports it as {hits[0]!r}; the bare "
                "name will stop working in a later release",
                FutureWarning,
                stacklevel=2,
            )
            return self[hits[0]]
        raise KeyError(f"{key!r} is not among the results; keys: {sorted(self)}")


def canonical_monitors(
    trainer: TrainerConfig, scheduler: SchedulerConfig | None, metric_keys: Iterable[str],
    stage: str = "val",
) -> tuple[TrainerConfig, SchedulerConfig | None]:
    """Map bare metric names in monitors and the checkpoint filename to ``<stage>/`` keys.

    Args:
        trainer: The trainer config (its callbacks' monitors and checkpoint filename).
        scheduler: The scheduler config (its monitor).
        metric_keys: Bare metric keys, ``"<metric node>/<metric>"``.
        stage: The stage whose key a bare name stands for.

    Returns:
        The two configs, changed copies where a bare name was found (with one
        :class:`FutureWarning` naming every replacement).
    """
    bare = set(metric_keys)
    changed: list[str] = []

    def fix(key: str | None) -> str | None:
        if key is not None and key in bare:
            changed.append(f"{key!r} -> '{stage}/{key}'")
            return f"{stage}/{key}"
        return key

    cbs = trainer.callbacks
    ck = cbs.checkpoint
    if ck is not None:
        filename = ck.filename
        if filename is not None:
            def _sub(m: re.Match[str]) -> str:
                name = m.group(1)
                if name not in bare:
                    return m.group(0)
                return m.group(0).replace(name, fix(name) or name, 1)

            filename = _FIELD.sub(_sub, filename)
        ck = ck.model_copy(update={"monitor": fix(ck.monitor), "filename": filename})
    stops = tuple(es.model_copy(update={"monitor": fix(es.monitor)}) for es in cbs.early_stopping)
    new_scheduler = scheduler
    if scheduler is not None:
        new_scheduler = scheduler.model_copy(update={"monitor": fix(scheduler.monitor)})
    if not changed:
        return trainer, scheduler
    scheduler = new_scheduler
    warnings.warn(
        "bare metric names are deprecated in monitors and checkpoint filenames: validation "
        f"metrics are logged as '{stage}/<metric node>/<metric>'; read as "
        f"{', '.join(sorted(set(changed)))}",
        FutureWarning,
        stacklevel=3,
    )
    callbacks = CallbacksConfig(checkpoint=ck, early_stopping=stops, lr_monitor=cbs.lr_monitor)
    return trainer.model_copy(update={"callbacks": callbacks}), scheduler


def check_checkpoint_filename(trainer: TrainerConfig, logged: Iterable[str]) -> None:
    """Fail when the checkpoint ``filename`` template names a key that is never logged.

    Lightning fills an unknown field with 0 (``best-{val_iou:.3f}`` is always ``0.000``); this
    says so when the trainer is built instead.

    Raises:
        TrainingError: Naming the unknown fields and the keys that may be used.
    """
    ck = trainer.callbacks.checkpoint
    if ck is None or not ck.filename:
        return
    have = set(logged) | _ALWAYS_KNOWN
    unknown = [n for n in _FIELD.findall(ck.filename) if n not in have]
    if unknown:
        raise TrainingError(
            f"trainer.callbacks.checkpoint.filename {ck.filename!r} names {unknown}, which is "
            "never logged (Lightning would write 0 for it). Use epoch, step or a logged key: "
            f"{', '.join(sorted(have - _ALWAYS_KNOWN))}; e.g. "
            "'best-{epoch:02d}-{val/metrics_anomaly/iou:.3f}'"
        )


def resolve_training_config(
    training_config: TrainingConfig | None,
    trainer_config: TrainerConfig | TrainingConfig | None,
    optimizer_config: OptimizerConfig | None,
    scheduler_config: SchedulerConfig | None,
    seed: int | None,
) -> tuple[TrainerConfig, OptimizerConfig, SchedulerConfig | None, int | None]:
    """Merge a :class:`TrainingConfig` with the per-part arguments of ``GradientTrainer``.

    A ``TrainingConfig`` may come as ``training_config=`` or in place of ``trainer_config``; its
    parts fill what is not passed explicitly, and its ``seed`` is used unless ``seed`` is given.

    Raises:
        ConfigError: A part given both ways with different values.
    """
    if isinstance(trainer_config, TrainingConfig):
        if training_config is not None and training_config != trainer_config:
            raise ConfigError(
                "two different TrainingConfigs given (training_config= and trainer_config=); "
                "pass one"
            )
        training_config, trainer_config = trainer_config, None
    if training_config is None:
        return (trainer_config or TrainerConfig(), optimizer_config or OptimizerConfig(),
                scheduler_config, seed)
    tc = training_config
    for name, given, own in (("trainer_config", trainer_config, tc.trainer),
                             ("optimizer_config", optimizer_config, tc.optimizer),
                             ("scheduler_config", scheduler_config, tc.scheduler)):
        if given is not None and given != own:
            raise ConfigError(
                f"{name} differs from the one inside training_config; pass it one way only"
            )
    return tc.trainer, tc.optimizer, tc.scheduler, tc.seed if seed is None else seed


def default_logger(trainer: TrainerConfig) -> Any:
    """A CSV logger under the run's output folder (``default_root_dir``, else ``outputs/``).

    Lightning's ``LearningRateMonitor`` (the guide's ``lr_monitor``) refuses to run without a
    logger; this one writes ``<root>/lightning_logs/version_<n>/metrics.csv`` and needs no
    server. Pass ``logger=False`` to ``GradientTrainer`` for none.
    """
    from lightning.pytorch.loggers import CSVLogger

    root = Path(trainer.default_root_dir) if trainer.default_root_dir else Path("outputs")
    return CSVLogger(save_dir=str(root), name="lightning_logs")


def evaluation_keys(metric_nodes: Iterable[Any], stage: str) -> dict[str, str]:
    """``{bare key: logged key}`` of the metric nodes' results in ``stage``."""
    return {f"{m.name}/{k}": f"{stage}/{m.name}/{k}" for m in metric_nodes
            for k in m.METRIC_NAMES}


def as_results(values: Mapping[str, Any]) -> Results:
    """Float :class:`Results` of any metric mapping (tensors included)."""
    return Results({k: float(v) for k, v in values.items()})
