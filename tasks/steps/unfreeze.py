"""Step ``unfreeze``: the fitted pipeline with the chosen nodes' buffers turned into parameters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

if TYPE_CHECKING:

    pass
from tasks.steps.base import STEP_VERSIONS, DataRef, PipelineRef, RunContext
from tasks.steps.data import build_pipeline, restore_state
from tasks.steps.run import log_run_artifact, log_run_metrics, set_run_tags


@task(name="unfreeze", version=STEP_VERSIONS["unfreeze"], persist_result=False)
def unfreeze(ctx: RunContext, data: DataRef, state_hash: str, reused: bool) -> PipelineRef:
    """Build the pipeline from an initialization state and unfreeze the Phase-2 nodes.

    Restores the state by its DVC hash (cache or remote), tags the run with its lineage (data,
    state, params, code) and saves the unfrozen pipeline for ``gradient_train``.

    Args:
        ctx: Run context.
        data: The data the run trains on.
        state_hash: DVC hash of the initialization state (fitted now, or the champion's).
        reused: The state is the champion's (Phase 1 skipped after a drift check).
    """
    from nodes.training.init_state import load_init_state, read_init_info
    from tasks.tracking import git_commit, set_lineage_tags

    p = ctx.params
    state_path = restore_state(ctx, state_hash)
    info = read_init_info(state_path)
    mode = info.extra.get("selector_mode") or p.pipeline.selector_mode
    pipeline = build_pipeline(p, data.channels, selector_mode=mode)
    load_init_state(pipeline, state_path)
    pipeline.unfreeze_nodes_by_name(p.pipeline.unfreeze)
    cfg, _ = pipeline.save_to_file(ctx.out / "pipeline_init.yaml")
    trainable = sum(t.numel() for t in pipeline.parameters() if t.requires_grad)
    if ctx.run_id is not None:
        set_lineage_tags(
            data.data_hash, state_hash, p.section_hash(), git_commit(Path(ctx.root)), ctx.run_id
        )
        set_run_tags(
            ctx,
            {
                "cubeline.init_state_reused": str(reused).lower(),
                "cubeline.data_dirty": str(data.dirty).lower(),
                "cubeline.data_recorded_hash": data.recorded_hash,
                "cubeline.init_state_source_data_hash": info.source_data_hash,
                "cubeline.selector_mode": str(mode),
            },
        )
        log_run_metrics(ctx, {"pixels": info.pixel_count, "passes": info.passes}, prefix="phase1/")
        # Phase 1 alone on the validation frames, from the state itself: there whether Phase 1
        # ran in this flow run, came from the cache or is the champion's.
        log_run_metrics(ctx, info.extra.get("val_metrics", {}), prefix="phase1/val/")
        log_run_metrics(ctx, info.extra.get("init_quality", {}), prefix="phase1/")
        log_run_metrics(
            ctx,
            {f"{m}/metrics_anomaly/ap": ap
             for m, ap in info.extra.get("selector_mode_val_ap", {}).items()},
            prefix="phase1/val_by_selector_mode/",
        )
        log_run_artifact(ctx, state_path, "init_state")
        log_run_artifact(ctx, state_path.with_suffix(".json"), "init_state")
    return PipelineRef(
        config_path=str(cfg),
        state_hash=state_hash,
        reused_state=reused,
        unfrozen=tuple(pipeline.unfrozen_node_names()),
        trainable_parameters=int(trainable),
    )
