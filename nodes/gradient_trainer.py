"""Phase 2: gradient training of the unfrozen nodes with PyTorch Lightning.

The pipeline stays a plain ``nn.Module``; :class:`PipelineModule` is the thin Lightning wrapper
(anomalib's split) that sums the loss nodes, logs ``train/<loss>`` / ``val/<loss>`` and
``<metric node>/<metric>``, and builds the optimizer and scheduler from the typed configs.
After training, the decision threshold is calibrated on the validation split from a streaming
score histogram (:mod:`nodes.threshold`) and stored in the pipeline's :class:`BinaryDecider`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from nodes.base import Node
from nodes.config import (
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    TrainingConfig,
)
from nodes.errors import NotInitializedError, TrainingError
from nodes.heads import BinaryDecider
from nodes.losses import AnomalyBCEWithLogits
from nodes.metrics import AnomalyDetectionMetrics
from nodes.optim import build_optimizer, build_scheduler, build_trainer_kwargs, check_monitored_keys
from nodes.pipeline import Pipeline
from nodes.threshold import ScoreHistogram, ThresholdCalibration, calibrate_threshold


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
        return [self.pipeline.nodes[n] for n in self.metric_names]  # type: ignore[misc]

    def _reset_metrics(self) -> None:
        for m in self._metric_nodes():
            m.reset()

    def _log_metrics(self) -> None:
        values = {f"{m.name}/{k}": v for m in self._metric_nodes() for k, v in m.compute().items()}
        # torchmetrics already all-reduced the states, so the values agree on every rank.
        self.log_dict({k: float(v) for k, v in values.items()}, sync_dist=False)

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self._reset_metrics()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:  # noqa: D102
        total, parts = self._losses(batch, "val")
        self._log_losses("val", total, parts, int(batch["cube"].shape[0]))

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_metrics()

    def on_test_epoch_start(self) -> None:  # noqa: D102
        self._reset_metrics()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:  # noqa: D102
        total, parts = self._losses(batch, "test")
        self._log_losses("test", total, parts, int(batch["cube"].shape[0]))

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._log_metrics()

    def configure_optimizers(self) -> Any:  # noqa: D102
        optimizer = build_optimizer(self.pipeline.parameters(), self.optimizer_config)
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
        logger: A Lightning logger (e.g. MLflow's) or None/False for none.
        callbacks: Extra Lightning callbacks.
        threshold_method: How to calibrate the decision threshold after fit: ``"auto"`` (max F1
            when the validation frames hold anomalies, else the target FPR), ``"fpr"``,
            ``"max_f1"`` or ``"none"``.
        target_fpr: Target false-positive rate for the ``"fpr"`` calibration.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        datamodule: Any,
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
    ) -> None:
        self.pipeline = pipeline
        self.datamodule = datamodule
        self.trainer_config = trainer_config or TrainerConfig()
        self.optimizer_config = optimizer_config or OptimizerConfig()
        self.scheduler_config = scheduler_config
        self.seed = seed
        self.logger = logger
        self.extra_callbacks = list(callbacks)
        self.threshold_method = threshold_method
        self.target_fpr = target_fpr
        self.calibration: ThresholdCalibration | None = None
        self.loss_nodes = list(loss_nodes)
        self.metric_nodes = list(metric_nodes)
        self._check_graph(self.loss_nodes, self.metric_nodes)
        self.module = PipelineModule(
            pipeline, self.loss_nodes, self.metric_nodes, self.optimizer_config,
            self.scheduler_config, max_epochs=self.trainer_config.max_epochs,
        )
        self.trainer: L.Trainer | None = None

    # ------------------------------------------------------------ checks
    def logged_keys(self) -> set[str]:
        """Every metric key this trainer logs (what monitors may name)."""
        keys = {f"{s}/{n.name}" for s in ("train", "val") for n in self.loss_nodes}
        if len(self.loss_nodes) > 1:
            keys |= {"train/loss", "val/loss"}
        keys |= {f"{m.name}/{k}" for m in self.metric_nodes for k in m.METRIC_NAMES}
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
    def _make_trainer(self) -> L.Trainer:
        kwargs = build_trainer_kwargs(self.trainer_config)
        kwargs["callbacks"] = [*kwargs["callbacks"], _TrackLastGood(), *self.extra_callbacks]
        kwargs["logger"] = self.logger if self.logger is not None else False
        kwargs.setdefault("num_sanity_val_steps", 0)
        kwargs.setdefault("enable_model_summary", False)
        return L.Trainer(**kwargs)

    def fit(self, ckpt_path: str | Path | None = None) -> dict[str, float]:
        """Train; ``ckpt_path`` (or ``"last"``) resumes an interrupted run.

        Returns:
            The last validation metrics, after the best checkpoint (if any) is restored and the
            decision threshold calibrated.
        """
        if self.seed is not None:
            L.seed_everything(self.seed, workers=True, verbose=False)
        if not any(p.requires_grad for p in self.pipeline.parameters()):
            raise TrainingError(
                "no trainable parameters: unfreeze nodes first, e.g. "
                "pipeline.unfreeze_nodes_by_name([selector.name, rx.name, head.name])"
            )
        self.trainer = self._make_trainer()
        self.trainer.fit(self.module, datamodule=self.datamodule,
                         ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
        self._restore_best()
        if self.threshold_method != "none":
            self.calibrate_threshold()
        return {k: float(v) for k, v in self.trainer.callback_metrics.items()}

    def _best_path(self) -> str | None:
        if self.trainer is None:
            return None
        cb = self.trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
            return str(cb.best_model_path)
        return None

    def _restore_best(self) -> None:
        best = self._best_path()
        if best and Path(best).is_file():
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            state = {k.removeprefix("pipeline."): v for k, v in ckpt["state_dict"].items()}
            self.pipeline.load_state_dict_resizing(state, source=best)

    def validate(self) -> dict[str, float]:
        """Metrics of the validation split with the current weights."""
        trainer = self.trainer or self._make_trainer()
        res = trainer.validate(self.module, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in res[0].items()} if res else {}

    def test(self) -> dict[str, float]:
        """Metrics of the test split with the best weights (restored after fit)."""
        trainer = self.trainer or self._make_trainer()
        res = trainer.test(self.module, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in res[0].items()} if res else {}

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
