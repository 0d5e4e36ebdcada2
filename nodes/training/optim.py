"""Builders that map the typed training configs 1:1 onto torch and Lightning objects.

Each config field becomes exactly one constructor argument, so what a YAML file says is what the
run does: :func:`build_optimizer` (``torch.optim``), :func:`build_scheduler` (Lightning's
``lr_scheduler`` config dict), :func:`build_callbacks` (``ModelCheckpoint``, ``EarlyStopping``,
``LearningRateMonitor``) and :func:`build_trainer_kwargs` (``lightning.Trainer`` arguments).
:func:`monitored_keys` / :func:`check_monitored_keys` let the gradient trainer verify that every
monitored metric is actually logged, so a typo in a metric name fails with a clear message rather
than Lightning's mid-training ``MisconfigurationException``.

Lightning is imported lazily (its import costs several seconds) and only from ``lightning``, never
``pytorch_lightning``: callbacks from the latter are rejected by a ``lightning`` Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nodes.errors import ConfigError, TrainingError
from nodes.training.config import (
    OPTIMIZER_NAMES,
    SCHEDULER_NAMES,
    CallbacksConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    TrainingConfig,
    monitor_entries,
)

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

__all__ = [
    "build_callbacks",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "build_trainer_kwargs",
    "check_monitored_keys",
    "monitored_keys",
]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def build_optimizer(params: ParamsT, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Build the torch optimizer that ``cfg`` names.

    Plain tensors that do not require gradients (frozen statistics) are dropped; parameter-group
    dicts are passed through unchanged.

    Args:
        params: Parameters (e.g. ``pipeline.parameters()``) or parameter-group dicts.
        cfg: The optimizer config.

    Returns:
        ``torch.optim.AdamW``, ``Adam`` or ``SGD`` with ``cfg``'s settings.

    Raises:
        ConfigError: When ``cfg.name`` is not a known optimizer.
        TrainingError: When there is no trainable parameter.
    """
    items: list[Any] = list(params)
    if items and not isinstance(items[0], dict):
        items = [p for p in items if isinstance(p, torch.Tensor) and p.requires_grad]
    if not items:
        raise TrainingError(
            "The optimizer got no trainable parameter: every node is frozen. Unfreeze the nodes "
            "to train first, e.g. pipeline.unfreeze_nodes_by_name([...]) after Phase 1."
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(items, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(items, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            items, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    # Only reachable for configs built with model_construct(), which skips validation.
    raise ConfigError(
        f"optimizer.name '{cfg.name}' is unknown; valid names: {', '.join(OPTIMIZER_NAMES)}."
    )


def build_param_groups(
    nodes: Iterable[tuple[str, torch.nn.Module]], cfg: OptimizerConfig
) -> list[dict[str, Any]]:
    """Group the trainable parameters of named nodes by ``cfg.param_groups``.

    One torch parameter group per configured group that has trainable parameters (named by its
    nodes, which ``LearningRateMonitor`` shows), plus one for every other trainable parameter
    at ``cfg.lr`` / ``cfg.weight_decay``. A ``relative_lr`` group becomes one torch group per
    parameter, at ``lr * RMS(p)`` of the parameter as it is now (named ``<nodes>/<i>``).

    Args:
        nodes: ``(node name, module)`` pairs, e.g. ``pipeline.nodes.items()``.
        cfg: The optimizer config.

    Returns:
        Parameter-group dicts for :func:`build_optimizer`.

    Raises:
        ConfigError: When a group names a node that is not among ``nodes``.
    """
    named = list(nodes)
    known = {name for name, _ in named}
    for group in cfg.param_groups:
        unknown = [n for n in group.nodes if n not in known]
        if unknown:
            raise ConfigError(
                f"optimizer.param_groups names unknown node(s) {unknown}; the pipeline's nodes: "
                f"{', '.join(sorted(known))}."
            )
    buckets: dict[int, list[torch.Tensor]] = {}
    for name, module in named:
        index = next((i for i, g in enumerate(cfg.param_groups) if name in g.nodes), -1)
        buckets.setdefault(index, []).extend(p for p in module.parameters() if p.requires_grad)
    out: list[dict[str, Any]] = []
    for index, params in sorted(buckets.items()):
        if not params:
            continue
        if index < 0:
            out.append({"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                        "name": "default"})
            continue
        group = cfg.param_groups[index]
        lr, wd = cfg.node_settings(group.nodes[0])
        name = "+".join(group.nodes)
        if not group.relative_lr:
            out.append({"params": params, "lr": lr, "weight_decay": wd, "name": name})
            continue
        for i, p in enumerate(params):
            rms = float(p.detach().double().square().mean().sqrt()) if p.numel() else 0.0
            scale = rms if math.isfinite(rms) and rms > 0 else 1.0
            out.append({"params": [p], "lr": lr * scale, "weight_decay": wd,
                        "name": f"{name}/{i}"})
    return out


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, *, max_epochs: int | None = None
) -> dict[str, Any]:
    """Build a scheduler in the dict form Lightning's ``configure_optimizers`` accepts.

    Args:
        optimizer: The optimizer to schedule.
        cfg: The scheduler config.
        max_epochs: Period of ``cosine`` when ``cfg.t_max`` is unset (the trainer's max_epochs).

    Returns:
        ``{"scheduler": ..., "interval": ..., "frequency": ...}`` plus ``"monitor"`` and
        ``"strict": True`` for ``reduce_on_plateau``.

    Raises:
        ConfigError: When ``cfg.name`` is unknown, or ``cosine`` has neither ``t_max`` nor
            ``max_epochs``.
    """
    out: dict[str, Any] = {"interval": cfg.interval, "frequency": cfg.frequency}
    if cfg.name == "reduce_on_plateau":
        if not cfg.monitor:
            raise ConfigError("scheduler.monitor is required for reduce_on_plateau.")
        out["scheduler"] = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=cfg.mode,
            factor=cfg.factor,
            patience=cfg.patience,
            min_lr=cfg.min_lr,
        )
        out["monitor"] = cfg.monitor
        # strict: a monitor that is never logged must stop the run, not be skipped silently.
        out["strict"] = True
    elif cfg.name == "cosine":
        t_max = cfg.t_max if cfg.t_max is not None else max_epochs
        if t_max is None:
            raise ConfigError(
                "scheduler 'cosine' needs a period: set scheduler.t_max or pass max_epochs."
            )
        out["scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=t_max, eta_min=cfg.eta_min
        )
    elif cfg.name == "step":
        out["scheduler"] = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=cfg.step_size, gamma=cfg.gamma
        )
    else:
        raise ConfigError(
            f"scheduler.name '{cfg.name}' is unknown; valid names: {', '.join(SCHEDULER_NAMES)}."
        )
    return out


def build_callbacks(
    cfg: CallbacksConfig | None, *, default_dirpath: str | Path | None = None
) -> list[Callback]:
    """Build the Lightning callbacks of ``cfg`` (checkpoint, early stops in order, LR monitor).

    Args:
        cfg: The callbacks config; ``None`` gives no callbacks.
        default_dirpath: Checkpoint folder when ``cfg.checkpoint.dirpath`` is unset. Pass one:
            left ``None``, Lightning writes checkpoints under the working directory.

    Returns:
        The callbacks, ready for ``lightning.Trainer(callbacks=...)``.
    """
    if cfg is None:
        return []
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    callbacks: list[Callback] = []
    ck = cfg.checkpoint
    if ck is not None:
        dirpath = ck.dirpath if ck.dirpath is not None else default_dirpath
        callbacks.append(
            ModelCheckpoint(
                dirpath=dirpath,
                filename=ck.filename,
                monitor=ck.monitor,
                mode=ck.mode,
                save_top_k=ck.save_top_k,
                save_last=ck.save_last,
            )
        )
    for es in cfg.early_stopping:
        callbacks.append(
            EarlyStopping(
                monitor=es.monitor,
                mode=es.mode,
                patience=es.patience,
                min_delta=es.min_delta,
                check_finite=es.check_finite,
            )
        )
    if cfg.lr_monitor is not None:
        callbacks.append(
            LearningRateMonitor(
                logging_interval=cfg.lr_monitor.logging_interval,
                log_momentum=cfg.lr_monitor.log_momentum,
            )
        )
    return callbacks


def build_trainer_kwargs(
    cfg: TrainerConfig, *, default_dirpath: str | Path | None = None
) -> dict[str, Any]:
    """Return the ``lightning.Trainer`` keyword arguments of ``cfg``, callbacks included.

    ``enable_checkpointing`` follows the config: on exactly when a checkpoint is configured, so
    Lightning neither adds its own default checkpoint (into the working directory) nor refuses
    ours.

    Args:
        cfg: The trainer config.
        default_dirpath: Checkpoint folder when the checkpoint config has none; defaults to
            ``<default_root_dir>/checkpoints`` when ``cfg.default_root_dir`` is set.

    Returns:
        Keyword arguments for ``lightning.Trainer`` (add ``logger`` yourself).
    """
    if default_dirpath is None and cfg.default_root_dir is not None:
        default_dirpath = Path(cfg.default_root_dir) / "checkpoints"
    devices: int | str | list[int] = (
        cfg.devices if isinstance(cfg.devices, int | str) else list(cfg.devices)
    )
    return {
        "max_epochs": cfg.max_epochs,
        "accelerator": cfg.accelerator,
        "devices": devices,
        "strategy": cfg.strategy,
        "precision": cfg.precision,
        "callbacks": build_callbacks(cfg.callbacks, default_dirpath=default_dirpath),
        "enable_checkpointing": cfg.callbacks.checkpoint is not None,
        "log_every_n_steps": cfg.log_every_n_steps,
        "check_val_every_n_epoch": cfg.check_val_every_n_epoch,
        "accumulate_grad_batches": cfg.accumulate_grad_batches,
        "gradient_clip_val": cfg.gradient_clip_val,
        "gradient_clip_algorithm": cfg.gradient_clip_algorithm,
        "enable_progress_bar": cfg.enable_progress_bar,
        "default_root_dir": cfg.default_root_dir,
        "deterministic": cfg.deterministic,
    }


def monitored_keys(cfg: TrainingConfig) -> set[str]:
    """Return every metric key that the scheduler, checkpoint and early stops monitor.

    The scheduler's ``monitor`` counts only for ``reduce_on_plateau`` (the others ignore it).
    """
    return {key for key, _mode, _where in monitor_entries(cfg)}


def check_monitored_keys(cfg: TrainingConfig, logged: Iterable[str]) -> None:
    """Fail unless every monitored metric key is among the ``logged`` keys.

    Args:
        cfg: The training config.
        logged: Metric keys the training module logs (e.g. ``trainer.callback_metrics``).

    Raises:
        TrainingError: Naming each missing key, the config field that monitors it and the keys
            that are logged.
    """
    have = set(logged)
    missing = [(key, where) for key, _mode, where in monitor_entries(cfg) if key not in have]
    if not missing:
        return
    listed = "; ".join(f"'{key}' (monitored by {where})" for key, where in missing)
    available = ", ".join(sorted(have)) or "(none)"
    raise TrainingError(
        f"Monitored metric(s) not logged: {listed}. Logged keys: {available}. Fix the monitor "
        "name in the training config or log that metric."
    )
