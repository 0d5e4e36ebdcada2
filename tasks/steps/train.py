"""Step ``gradient_train``: Phase 2 with Lightning, logged into the flow run's MLflow run."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from prefect import task

if TYPE_CHECKING:

    pass
from tasks.steps.base import STEP_VERSIONS, DataRef, PipelineRef, RunContext, TrainResult
from tasks.steps.data import run_datamodule
from tasks.steps.run import log_run_artifact, log_run_metrics, set_run_tags


@task(name="gradient_train", version=STEP_VERSIONS["gradient_train"], persist_result=False)
def gradient_train(ctx: RunContext, data: DataRef, pipe: PipelineRef) -> TrainResult:
    """Phase 2 on Lightning, per-epoch metrics to the run through Lightning's MLflow logger.

    The best checkpoint is restored and the decision threshold calibrated on the validation
    frames (``params.yaml`` ``threshold``); the trained pipeline is saved and logged.
    """
    from lightning.pytorch.callbacks import ModelSummary

    from nodes.graph.pipeline import Pipeline
    from nodes.library.presets import PresetHandle
    from nodes.training.gradient_trainer import GradientTrainer
    from tasks.env import quiet_lightning
    from tasks.faults import epoch_fault_callback
    from tasks.steps.resume import Phase2Resume

    quiet_lightning()

    p = ctx.params
    pipeline = Pipeline.load_from_file(pipe.config_path)
    dm = run_datamodule(ctx, data)
    cfg = p.phase2.trainer
    updates: dict[str, Any] = {"default_root_dir": str(ctx.out / "lightning")}
    logger: Any = None
    if ctx.run_id is not None and ctx.tracking_uri is not None:
        from tasks.tracking import make_lightning_logger

        logger = make_lightning_logger(ctx.run_id, ctx.tracking_uri)
    elif cfg.callbacks.lr_monitor is not None:
        # Lightning's LearningRateMonitor refuses to run without a logger.
        updates["callbacks"] = cfg.callbacks.model_copy(update={"lr_monitor": None})
    handle = PresetHandle.of(pipeline)
    resume = Phase2Resume.for_run(ctx, data, pipe)
    trainer = GradientTrainer(
        pipeline,
        dm,
        loss_nodes=list(handle.loss_nodes),
        metric_nodes=list(handle.metric_nodes),
        trainer_config=cfg.model_copy(update=updates),
        optimizer_config=p.phase2.optimizer,
        scheduler_config=p.phase2.scheduler,
        seed=p.phase2.seed,
        logger=logger,
        # The layer table says nothing the run's params do not; keep orchestrated logs short.
        callbacks=[ModelSummary(max_depth=0), resume.callback(), epoch_fault_callback()],
        threshold_method=p.threshold.method,
        target_fpr=p.threshold.target_fpr,
    )
    start = time.perf_counter()
    val = trainer.fit(ckpt_path=resume.last())
    resume.done()
    seconds = time.perf_counter() - start
    cfg_path, weights_path = pipeline.save_to_file(ctx.out / "pipeline.yaml")
    log_run_artifact(ctx, cfg_path, "pipeline")
    log_run_artifact(ctx, weights_path, "pipeline")
    cal = trainer.calibration
    threshold = float(cal.threshold) if cal is not None else None
    if threshold is not None and not math.isfinite(threshold):
        from nodes.errors import DegenerateStatisticsError

        raise DegenerateStatisticsError(
            f"the decision threshold calibrated on the val frames is {threshold} (the scores are "
            "not finite): the model would flag every pixel or none. Fix: check the val and "
            "training frames for constant or duplicated bands, or set phase1.degenerate: ridge"
        )
    epochs = int(trainer.trainer.current_epoch) if trainer.trainer is not None else 0
    log_run_metrics(ctx, {"seconds": seconds, "epochs": epochs}, prefix="phase2/")
    report = trainer.report
    if report is not None:
        # Whether Phase 2 handed back its best epoch or fell back to the Phase-1 state.
        log_run_metrics(ctx, {"kept_phase1": float(report.kept_phase1),
                           "phase1_val_score": report.phase1_score}, prefix="phase2/")
        set_run_tags(ctx, {"cubeline.phase2_outcome": report.outcome,
                        "cubeline.phase2_summary": report.summary()})
    if threshold is not None:
        log_run_metrics(ctx, {"threshold_logit": threshold})
    return TrainResult(
        config_path=str(cfg_path),
        state_hash=pipe.state_hash,
        val_metrics={k: float(v) for k, v in val.items()},
        threshold=threshold,
        epochs=epochs,
        seconds=seconds,
    )
