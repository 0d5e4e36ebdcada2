"""Phase 2: gradient training of the unfrozen nodes with PyTorch Lightning.

The pipeline stays a plain ``nn.Module``; :class:`PipelineModule` is the thin Lightning wrapper
(anomalib's split) that sums the loss nodes, logs ``train/<loss>`` / ``val/<loss>`` and
``val/<metric node>/<metric>`` (``test/...`` when testing), and builds the optimizer and
scheduler from the typed configs. Bare metric names (``metrics_anomaly/iou``, as earlier
releases logged them) are still accepted in monitors and results, with a deprecation warning
(:mod:`nodes.training.results`).
After training, the decision threshold is calibrated on the validation split from a streaming
score histogram (:mod:`nodes.training.threshold`) and stored in the pipeline's
:class:`BinaryDecider`.

Phase 2 never hands back a model that is worse on validation than the Phase-1 initialization it
started from: the Phase-1 state is scored on the validation split before the first step, every
validation epoch's weights are kept in memory when they beat the best so far on the monitored
metric, and after training the pipeline gets the best epoch's weights, or the Phase-1 state
back when no epoch beat it. :attr:`GradientTrainer.report` (a :class:`Phase2Report`) says which.

Why one module of over 400 lines: the Lightning wrapper, the trainer and the threshold
calibration after ``fit`` share one training loop's state; configs, optimizers and results
live in :mod:`~nodes.training.config`, :mod:`~nodes.training.optim`,
:mod:`~nodes.training.results`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from nodes.errors import NotInitializedError, TrainingError
from nodes.graph.base import Node
from nodes.graph.pipeline import Pipeline
from nodes.library.heads import BinaryDecider
from nodes.library.losses import AnomalyBCEWithLogits
from nodes.library.metrics import AnomalyDetectionMetrics, warn_if_no_anomalies
from nodes.training.config import (
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    TrainingConfig,
    monitor_entries,
)
from nodes.training.optim import (
    build_optimizer,
    build_param_groups,
    build_scheduler,
    build_trainer_kwargs,
    check_monitored_keys,
)
from nodes.training.results import (
    as_results,
    canonical_monitors,
    check_checkpoint_filename,
    default_logger,
    evaluation_keys,
    resolve_training_config,
)
from nodes.training.threshold import ScoreHistogram, ThresholdCalibration, calibrate_threshold


class PipelineModule(L.LightningModule):
    """Lightning wrapper around a :class:`Pipeline` for Phase 2.

    Args:
        pipeline: The pipeline, with the nodes to train unfrozen.
        loss_nodes: Nodes whose ``loss`` outputs are summed.
        metric_nodes: Metric nodes reported at the end of each validation/test epoch.
        optimizer_config: Optimizer settings.
        scheduler_config: Scheduler settings, or None.
        max_epochs: Used as the cosine period when the scheduler sets none.
    """

    def __init__(self, pipeline: Pipeline, loss_nodes: Sequence[Node],
                 metric_nodes: Sequence[AnomalyDetectionMetrics],
                 optimizer_config: OptimizerConfig, scheduler_config: SchedulerConfig | None,
                 max_epochs: int | None = None) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.loss_names = [n.name for n in loss_nodes]
        self.metric_names = [n.name for n in metric_nodes]
        self.optimizer_config = optimizer_config
        self.scheduler_config = scheduler_config
        self.max_epochs = max_epochs
        self.last_good_checkpoint: str | None = None

    def _losses(self, batch: Mapping[str, Any], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.pipeline.forward(batch, stage=stage)
        parts = {n: out[f"{n}.loss"] for n in self.loss_names}
        total = torch.stack([v.to(torch.float32) for v in parts.values()]).sum()
        return total, parts

    def _log_losses(self, stage: str, total: Tensor, parts: dict[str, Tensor], bs: int) -> None:
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=bs,
                     sync_dist=True, prog_bar=stage == "val")
        if len(parts) > 1:
            self.log(f"{stage}/loss", total, on_step=False, on_epoch=True, batch_size=bs,
                     sync_dist=True)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Forward, sum the losses, stop on a non-finite loss."""
        total, parts = self._losses(batch, "train")
        if not torch.isfinite(total):
            ckpt = self.last_good_checkpoint or "none saved yet"
            value = float(total.detach())
            raise TrainingError(
                f"non-finite training loss ({value}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); training stopped. Last good "
                f"checkpoint: {ckpt}. Lower the learning rate, clip gradients "
                "(trainer.gradient_clip_val) or check the input data for extreme values."
            )
        self._log_losses("train", total, parts, int(batch["cube"].shape[0]))
        return total

    def _metric_nodes(self) -> list[AnomalyDetectionMetrics]:
        return [self.pipeline.node(n, AnomalyDetectionMetrics) for n in self.metric_names]

    def _reset_metrics(self) -> None:
        for m in self._metric_nodes():
            m.reset()

    def _metric_values(self, stage: str) -> dict[str, float]:
        """The metric nodes' results under the keys they are logged with in ``stage``."""
        return {f"{stage}/{m.name}/{k}": float(v) for m in self._metric_nodes()
                for k, v in m.compute().items()}

    def _log_metrics(self, stage: str) -> None:
        splits = getattr(getattr(self._trainer, "datamodule", None), "splits", None)
        warn_if_no_anomalies(self._metric_nodes(), stage,
                             splits.get(stage) if isinstance(splits, dict) else None,
                             self.pipeline)
        values = self._metric_values(stage)
        # torchmetrics already all-reduced the states, so the values agree on every rank.
        self.log_dict({k: float(v) for k, v in values.items()}, sync_dist=False)

    def evaluate(self, batches: Iterable[Mapping[str, Any]],
                 stage: str = "val") -> dict[str, float]:
        """Losses and metrics of ``batches`` with the current weights, without Lightning.

        Keys and reductions are those of a validation epoch (losses averaged per pixel batch
        as ``self.log`` does, metric nodes over all batches), so the result compares with what
        the loop logs; nothing is logged.
        """
        self._reset_metrics()
        device = next(iter(self.pipeline.buffers())).device
        sums: dict[str, float] = {}
        count = 0
        was_training = self.pipeline.training
        self.pipeline.eval()
        with torch.no_grad():
            for batch in batches:
                b = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                total, parts = self._losses(b, stage)
                n = int(b["cube"].shape[0])
                count += n
                for name, value in parts.items():
                    key = f"{stage}/{name}"
                    sums[key] = sums.get(key, 0.0) + float(value) * n
                if len(parts) > 1:
                    sums[f"{stage}/loss"] = sums.get(f"{stage}/loss", 0.0) + float(total) * n
        self.pipeline.train(was_training)
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out.update(self._metric_values(stage))
        self._reset_metrics()
        return out

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self._reset_metrics()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:  # noqa: D102
        total, parts = self._losses(batch, "val")
        self._log_losses("val", total, parts, int(batch["cube"].shape[0]))

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:  # noqa: D102
        self._reset_metrics()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:  # noqa: D102
        total, parts = self._losses(batch, "test")
        self._log_losses("test", total, parts, int(batch["cube"].shape[0]))

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:  # noqa: D102
        cfg = self.optimizer_config
        params: Any = (build_param_groups(self.pipeline.nodes.items(), cfg) if cfg.param_groups
                       else self.pipeline.parameters())
        optimizer = build_optimizer(params, cfg)
        if self.scheduler_config is None:
            return optimizer
        sched = build_scheduler(optimizer, self.scheduler_config, max_epochs=self.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": sched}


class _TrackLastGood(Callback):
    """Remember the newest checkpoint, named in the NaN-loss error message."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                path = cb.last_model_path or cb.best_model_path
                if path and isinstance(pl_module, PipelineModule):
                    pl_module.last_good_checkpoint = path


@dataclass
class Phase2Report:
    """What :meth:`GradientTrainer.fit` handed back, and why.

    Attributes:
        monitor: The validation metric that ranks the epochs (a logged key).
        mode: ``"max"`` or ``"min"``: which direction is better.
        phase1_score: The monitored metric of the Phase-1 initialization on the validation split.
        best_score: The best epoch's monitored metric (None when no epoch gave a finite value).
        best_epoch: The epoch whose weights were kept (0-based); None when Phase 1 was kept.
        epochs_run: Training epochs completed.
        kept_phase1: True when no epoch beat the Phase-1 initialization on validation, so the
            pipeline holds its Phase-1 state again.
        val_metrics: The validation losses and metrics of the model handed back.
        phase1_val_metrics: The validation losses and metrics of the Phase-1 initialization.
    """

    monitor: str
    mode: Literal["min", "max"]
    phase1_score: float
    best_score: float | None
    best_epoch: int | None
    epochs_run: int
    kept_phase1: bool
    val_metrics: dict[str, float] = field(default_factory=dict)
    phase1_val_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """``"phase1_kept"`` or ``"best_epoch"``."""
        return "phase1_kept" if self.kept_phase1 else "best_epoch"

    def summary(self) -> str:
        """One line for logs."""
        if self.kept_phase1:
            best = "none finite" if self.best_score is None else f"{self.best_score:.4g}"
            return (f"Phase 2 kept the Phase-1 state: no epoch beat it on {self.monitor} "
                    f"({self.mode}; Phase 1 {self.phase1_score:.4g}, best epoch {best})")
        return (f"Phase 2 kept epoch {self.best_epoch}: {self.monitor} {self.best_score:.4g} "
                f"vs Phase 1 {self.phase1_score:.4g} ({self.mode})")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/MLflow friendly), with ``outcome``."""
        return {**asdict(self), "outcome": self.outcome}


def _better(a: float, b: float | None, mode: str) -> bool:
    """Whether score ``a`` strictly beats ``b`` (NaN never beats; anything finite beats NaN)."""
    if not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a > b if mode == "max" else a < b


class _BestWeights(Callback):
    """Keep the weights of the best validation epoch in memory (and in checkpoints, for resume).

    The pipeline is small (a few thousand numbers), so a CPU copy per improvement costs nothing;
    the state travels in Lightning checkpoints through ``state_dict``, so a resumed run still
    knows the Phase-1 score and the best epoch before the interruption.
    """

    def __init__(self, monitor: str, mode: Literal["min", "max"]) -> None:
        self.monitor = monitor
        self.mode = mode
        self.phase1_score = float("nan")
        self.phase1_state: dict[str, Tensor] | None = None
        self.phase1_metrics: dict[str, float] = {}
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.best_metrics: dict[str, float] = {}

    def set_phase1(self, pipeline: Pipeline, metrics: dict[str, float]) -> None:
        """Record the Phase-1 state and its validation metrics (before the first step)."""
        self.phase1_state = _cpu_state(pipeline)
        self.phase1_metrics = dict(metrics)
        self.phase1_score = float(metrics.get(self.monitor, float("nan")))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(pl_module, PipelineModule):
            return
        if trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        score = float(value)
        if _better(score, self.best_score, self.mode):
            self.best_score = score
            self.best_epoch = int(trainer.current_epoch)
            self.best_state = _cpu_state(pl_module.pipeline)
            self.best_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                                 if not k.startswith("train/")}

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "phase1_score": self.phase1_score,
                "phase1_state": self.phase1_state, "phase1_metrics": self.phase1_metrics,
                "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "best_metrics": self.best_metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") != self.monitor or state_dict.get("mode") != self.mode:
            return  # ranked by another metric: start the ranking afresh
        self.phase1_score = float(state_dict["phase1_score"])
        self.phase1_state = state_dict["phase1_state"]
        self.phase1_metrics = dict(state_dict["phase1_metrics"])
        self.best_score = state_dict["best_score"]
        self.best_epoch = state_dict["best_epoch"]
        self.best_state = state_dict["best_state"]
        self.best_metrics = dict(state_dict["best_metrics"])


def _cpu_state(pipeline: Pipeline) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in pipeline.state_dict().items()}


class GradientTrainer:
    """Train the unfrozen nodes of a pipeline (Phase 2) on a datamodule.

    Args:
        pipeline: A pipeline whose statistical nodes are initialized (Phase 1).
        datamodule: A LightningDataModule yielding the batch contract.
        loss_nodes: Loss nodes of the pipeline (at least one).
        metric_nodes: Metric nodes to report.
        trainer_config: Lightning trainer settings (epochs, accelerator, callbacks, ...).
        optimizer_config: Optimizer settings.
        scheduler_config: Optional learning-rate scheduler.
        seed: Seed for torch/numpy/python RNGs (repeatable CPU runs); None leaves them.
        logger: A Lightning logger (e.g. MLflow's); None (default): a CSV logger under
            ``trainer_config.default_root_dir`` (else ``outputs/``); False: none.
        callbacks: Extra Lightning callbacks.
        threshold_method: How to calibrate the decision threshold after fit: ``"auto"`` (max F1
            when the validation frames hold anomalies, else the target FPR), ``"fpr"``,
            ``"max_f1"`` or ``"none"``.
        target_fpr: Target false-positive rate for the ``"fpr"`` calibration.
        monitor: The logged validation key that ranks epochs (best-epoch weights, Phase-1
            fallback). None: the checkpoint's monitor, else the first early stop's, else the
            plateau scheduler's, else the summed validation loss.
        monitor_mode: ``"max"`` or ``"min"`` for ``monitor``; None takes the mode configured
            with the same key, else ``"min"`` for losses and ``"max"`` for metrics.
        training_config: The guide's :class:`TrainingConfig` (seed, optimizer, scheduler,
            trainer) in one piece, also accepted in place of ``trainer_config``; it fills the
            parts not passed explicitly, and its seed is used unless ``seed`` is given.

    Attributes:
        report: After :meth:`fit`, a :class:`Phase2Report`: the epoch kept, or that the
            Phase-1 state was kept (``report.kept_phase1``), with both validation scores.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        datamodule: L.LightningDataModule,
        loss_nodes: Sequence[Node],
        metric_nodes: Sequence[AnomalyDetectionMetrics],
        trainer_config: TrainerConfig | None = None,
        optimizer_config: OptimizerConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        *,
        seed: int | None = None,
        logger: Any = None,
        callbacks: Iterable[Callback] = (),
        threshold_method: str = "auto",
        target_fpr: float = 1e-3,
        monitor: str | None = None,
        monitor_mode: Literal["min", "max"] | None = None,
        training_config: TrainingConfig | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.datamodule = datamodule
        trainer_cfg, self.optimizer_config, scheduler_cfg, self.seed = resolve_training_config(
            training_config, trainer_config, optimizer_config, scheduler_config, seed)
        self.trainer_config, self.scheduler_config = canonical_monitors(
            trainer_cfg, scheduler_cfg, evaluation_keys(metric_nodes, "val"))
        self.logger = logger
        self.extra_callbacks = list(callbacks)
        self.threshold_method = threshold_method
        self.target_fpr = target_fpr
        self.calibration: ThresholdCalibration | None = None
        self.loss_nodes = list(loss_nodes)
        self.metric_nodes = list(metric_nodes)
        self._check_graph(self.loss_nodes, self.metric_nodes)
        check_checkpoint_filename(self.trainer_config, self.logged_keys())
        self.module = PipelineModule(
            pipeline, self.loss_nodes, self.metric_nodes, self.optimizer_config,
            self.scheduler_config, max_epochs=self.trainer_config.max_epochs,
        )
        self.trainer: L.Trainer | None = None
        self.monitor, self.monitor_mode = self._resolve_monitor(monitor, monitor_mode)
        self.report: Phase2Report | None = None

    # ------------------------------------------------------------ checks
    def _resolve_monitor(self, monitor: str | None,
                         mode: Literal["min", "max"] | None) -> tuple[str, Literal["min", "max"]]:
        cfg = TrainingConfig(optimizer=self.optimizer_config, scheduler=self.scheduler_config,
                             trainer=self.trainer_config)
        entries = monitor_entries(cfg)
        # The checkpoint's monitor first: it names what the run calls "best".
        ordered = sorted(entries, key=lambda e: (e[2] != "trainer.callbacks.checkpoint",
                                                 e[2] == "scheduler"))
        if monitor is None:
            if ordered:
                monitor = ordered[0][0]
            else:
                monitor = "val/loss" if len(self.loss_nodes) > 1 else \
                    f"val/{self.loss_nodes[0].name}"
        if monitor not in self.logged_keys():
            raise TrainingError(
                f"monitor {monitor!r} is not logged; logged keys: "
                f"{', '.join(sorted(self.logged_keys()))}"
            )
        if mode is None:
            same = [m for key, m, _ in entries if key == monitor]
            if same:
                mode = "max" if same[0] == "max" else "min"
            else:
                metrics = evaluation_keys(self.metric_nodes, "val").values()
                mode = "max" if monitor in metrics else "min"
        return monitor, mode

    def logged_keys(self) -> set[str]:
        """Every metric key this trainer logs (what monitors may name)."""
        keys = {f"{s}/{n.name}" for s in ("train", "val") for n in self.loss_nodes}
        if len(self.loss_nodes) > 1:
            keys |= {"train/loss", "val/loss"}
        keys |= set(evaluation_keys(self.metric_nodes, "val").values())
        return keys

    def _check_graph(self, loss_nodes: Sequence[Node],
                     metric_nodes: Sequence[AnomalyDetectionMetrics]) -> None:
        p = self.pipeline
        if not loss_nodes:
            raise TrainingError(
                "GradientTrainer needs at least one loss node (e.g. AnomalyBCEWithLogits) "
                "connected in the pipeline; pass it as loss_nodes=[...]"
            )
        for node in [*loss_nodes, *metric_nodes]:
            if node.name not in p.nodes or p.nodes[node.name] is not node:
                raise TrainingError(
                    f"node {node.name!r} is not part of pipeline {p.name!r}; connect it with "
                    "pipeline.connect() before training"
                )
            fed = p.inputs_of(node.name)
            missing = [k for k, s in type(node).INPUT_SPECS.items() if not s.optional
                       and k not in fed]
            if missing:
                raise TrainingError(
                    f"{type(node).__name__} {node.name!r} has unconnected inputs {missing}: "
                    f"connect them, e.g. (data_node.mask, {node.name}.{missing[0]})"
                )
            if "loss" not in type(node).OUTPUT_SPECS and node in loss_nodes:
                raise TrainingError(f"node {node.name!r} has no 'loss' output port")
        for node in p.node_list():
            if not node.is_initialized:
                raise NotInitializedError(
                    f"node {node.name!r} ({type(node).__name__}) is not initialized: run "
                    "StatisticalTrainer.fit() before GradientTrainer"
                )
        cfg = TrainingConfig(optimizer=self.optimizer_config, scheduler=self.scheduler_config,
                             trainer=self.trainer_config)
        check_monitored_keys(cfg, self.logged_keys() | _lr_keys(self.trainer_config))

    # ------------------------------------------------------------ running
    def _make_trainer(self, extra: Sequence[Callback] = ()) -> L.Trainer:
        kwargs = build_trainer_kwargs(self.trainer_config)
        kwargs["callbacks"] = [*kwargs["callbacks"], _TrackLastGood(), *extra,
                               *self.extra_callbacks]
        kwargs["logger"] = (default_logger(self.trainer_config) if self.logger is None
                            else self.logger)
        kwargs.setdefault("num_sanity_val_steps", 0)
        kwargs.setdefault("enable_model_summary", False)
        return L.Trainer(**kwargs)

    def fit(self, ckpt_path: str | Path | None = None) -> dict[str, float]:
        """Train; ``ckpt_path`` (or ``"last"``) resumes an interrupted run.

        Before the first step the Phase-1 state is scored on the validation split; afterwards
        the pipeline holds the weights of the best validation epoch on :attr:`monitor`, or its
        Phase-1 state again when no epoch beat that (see :attr:`report`). Then the decision
        threshold is calibrated.

        Returns:
            The validation losses and metrics of the weights handed back (over the last
            logged values, e.g. ``train/<loss>`` and learning rates).
        """
        if self.seed is not None:
            L.seed_everything(self.seed, workers=True, verbose=False)
        if not any(p.requires_grad for p in self.pipeline.parameters()):
            raise TrainingError(
                "no trainable parameters: unfreeze nodes first, e.g. "
                "pipeline.unfreeze_nodes_by_name([selector.name, rx.name, head.name])"
            )
        best = _BestWeights(self.monitor, self.monitor_mode)
        # A resumed run's checkpoint carries the scores before the interruption and replaces
        # these (the pipeline handed in is then not necessarily the Phase-1 state).
        best.set_phase1(self.pipeline, self._phase1_val_metrics())
        self.trainer = self._make_trainer([best])
        # weights_only: a checkpoint on disk is data, never code (a planted pickle cannot run).
        self.trainer.fit(self.module, datamodule=self.datamodule,
                         ckpt_path=str(ckpt_path) if ckpt_path is not None else None,
                         weights_only=True if ckpt_path is not None else None)
        self.report = self._hand_back(best, int(self.trainer.current_epoch))
        if self.threshold_method != "none":
            self.calibrate_threshold()
        last = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        return as_results({**last, **self.report.val_metrics})

    def _phase1_val_metrics(self) -> dict[str, float]:
        dm = self.datamodule
        dm.setup("validate")
        return self.module.evaluate(dm.val_dataloader(), stage="val")

    def _hand_back(self, best: _BestWeights, epochs_run: int) -> Phase2Report:
        """Load the best epoch's weights, or the Phase-1 state when no epoch beat it."""
        improved = (best.best_state is not None and best.best_score is not None
                    and _better(best.best_score, best.phase1_score, self.monitor_mode))
        if improved and best.best_state is not None:
            self.pipeline.load_state_dict_resizing(best.best_state, source="Phase-2 best epoch")
            val = best.best_metrics
        else:
            if best.phase1_state is not None:
                self.pipeline.load_state_dict_resizing(best.phase1_state,
                                                       source="Phase-1 initialization")
            val = best.phase1_metrics
        return Phase2Report(
            monitor=self.monitor, mode=self.monitor_mode, phase1_score=best.phase1_score,
            best_score=best.best_score, best_epoch=best.best_epoch if improved else None,
            epochs_run=epochs_run, kept_phase1=not improved, val_metrics=dict(val),
            phase1_val_metrics=dict(best.phase1_metrics),
        )

    def validate(self) -> dict[str, float]:
        """Metrics of the validation split with the current weights."""
        trainer = self.trainer or self._make_trainer()
        res = trainer.validate(self.module, datamodule=self.datamodule, verbose=False)
        return as_results(res[0] if res else {})

    def test(self) -> dict[str, float]:
        """Metrics of the test split with the best weights (restored after fit)."""
        trainer = self.trainer or self._make_trainer()
        res = trainer.test(self.module, datamodule=self.datamodule, verbose=False)
        return as_results(res[0] if res else {})

    # ---------------------------------------------------------- threshold
    def calibrate_threshold(self, low: float = -40.0, high: float = 40.0,
                            n_bins: int = 8000) -> ThresholdCalibration | None:
        """Calibrate the decider's threshold on the validation split (streamed histogram)."""
        deciders = [n for n in self.pipeline.node_list() if isinstance(n, BinaryDecider)]
        if not deciders:
            return None
        decider = deciders[0]
        edge = self.pipeline.inputs_of(decider.name)["logits"]
        key = f"{edge.src}.{edge.src_port}"
        mask_key = _mask_key(self.pipeline, self.loss_nodes)
        hist = ScoreHistogram(low, high, n_bins)
        dm = self.datamodule
        dm.setup("validate")
        device = next(iter(self.pipeline.buffers())).device
        was_training = self.pipeline.training
        self.pipeline.eval()
        with torch.no_grad():
            for batch in dm.val_dataloader():
                b = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                out = self.pipeline.forward(b, stage="inference", outputs=[key, mask_key])
                hist.update(out[key].reshape(-1).double().cpu(),
                            out[mask_key].reshape(-1).cpu())
        self.pipeline.train(was_training)
        cal = calibrate_threshold(hist, method=self.threshold_method,  # type: ignore[arg-type]
                                  target_fpr=self.target_fpr)
        if math.isfinite(cal.threshold):
            decider.set_logit_threshold(cal.threshold)
        self.calibration = cal
        return cal


def _lr_keys(cfg: TrainerConfig) -> set[str]:
    return {"lr-AdamW", "lr-Adam", "lr-SGD"} if cfg.callbacks.lr_monitor is not None else set()


def _mask_key(pipeline: Pipeline, loss_nodes: Sequence[Node]) -> str:
    for node in loss_nodes:
        if isinstance(node, AnomalyBCEWithLogits):
            edge = pipeline.inputs_of(node.name)["targets"]
            return f"{edge.src}.{edge.src_port}"
    for node in pipeline.node_list():
        if "mask" in type(node).OUTPUT_SPECS:
            return f"{node.name}.mask"
    raise TrainingError("cannot find the ground-truth mask to calibrate the threshold on")
