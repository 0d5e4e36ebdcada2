"""Step ``evaluate``: the trained pipeline scored on the test frames; metrics, curves and maps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import task

if TYPE_CHECKING:

    from nodes.data.datamodule import CubeDataModule
    from nodes.graph.pipeline import Pipeline
from tasks.steps.base import STEP_VERSIONS, DataRef, EvalResult, RunContext, TrainResult
from tasks.steps.data import run_datamodule
from tasks.steps.run import log_run_metrics, set_run_tags


def score_split(pipeline: Pipeline, dm: CubeDataModule, split: str) -> tuple[Any, Any, Any]:
    """Scores (N, H, W), targets (N, H, W) and frame ids of a split, with metrics computed.

    Runs the pipeline once per batch in the ``test`` stage, so the metric nodes accumulate
    while the scores are collected.
    """
    import numpy as np
    import torch

    from nodes.library.presets import PresetHandle

    handle = PresetHandle.of(pipeline)
    for m in handle.metric_nodes:
        m.reset()
    scores: list[Any] = []
    targets: list[Any] = []
    ids: list[int] = []
    pipeline.eval()
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    with torch.no_grad():
        for batch in loader:
            out = pipeline.forward(batch, stage="test")
            scores.append(out[handle.score_key].detach().cpu().numpy())
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
    scores, targets, ids = score_split(pipeline, run_datamodule(ctx, data), "test")
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
    log_run_metrics(ctx, metrics, prefix="test/")
    set_run_tags(ctx, {"cubeline.split_id": split_id})
    return EvalResult(
        metrics=metrics, split_id=split_id, artifacts={k: str(v) for k, v in paths.items()}
    )
