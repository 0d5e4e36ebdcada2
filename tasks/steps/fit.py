"""Step ``fit_statistics``: Phase 1, its initialization state versioned with DVC, cached."""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task

from nodes.errors import ConfigError, CubelineError

if TYPE_CHECKING:

    from nodes.data.datamodule import CubeDataModule
from tasks.steps.base import STEP_VERSIONS, DataRef, InitStateRef, RunContext
from tasks.steps.cache import cache_get, cache_put, step_key
from tasks.steps.data import (
    build_pipeline,
    phase1_trainer,
    restore_state,
    run_datamodule,
    state_store_dir,
)

log = logging.getLogger(__name__)


@task(name="fit_statistics", version=STEP_VERSIONS["fit_statistics"], persist_result=False)
def fit_statistics(ctx: RunContext, data: DataRef, use_cache: bool = True) -> InitStateRef:
    """Phase 1: fit the statistical nodes, save the initialization state, version it with DVC.

    With ``use_cache``, an earlier fit of the same data, params sections and step code (the
    step's cache key) is reused when its state is still restorable and matches its hash.

    Returns:
        The state's DVC hash and the fit's figures (``cached`` when reused).

    Raises:
        ConfigError: ``phase1.sharding`` asks for a runner that cannot start here.
    """
    from types import SimpleNamespace

    from nodes.training.init_state import save_init_state
    from tasks.sharding import shard_runner_scope
    from tasks.versioning import STATE_FILE, version_init_state

    key = step_key(("data", "pipeline", "phase1"))(
        SimpleNamespace(task=fit_statistics),  # type: ignore[arg-type]
        {"ctx": ctx, "data": data},
    )
    if use_cache:
        hit = cache_get(ctx, key, InitStateRef)
        if hit is not None:
            try:
                restore_state(ctx, hit.state_hash)  # present, and verified against its hash
                return InitStateRef(**{**hit.__dict__, "cached": True})
            except CubelineError as exc:
                log.warning("cached Phase-1 state %s unusable (%s): fitting again", hit, exc)
    from tasks.faults import fault

    fault("phase1")
    p = ctx.params
    dm = run_datamodule(ctx, data)
    p = _refuse_or_repair(ctx, data, dm, p)
    # selector_mode auto: both readings of the selector are fitted; the one with the higher
    # Phase-1 validation AP is kept (recorded in the state and the run).
    modes = ("soft", "hard") if p.pipeline.selector_mode == "auto" else (p.pipeline.selector_mode,)
    fits = []
    for mode in modes:
        pipeline = build_pipeline(p, data.channels, selector_mode=mode)
        # runner: inprocess gives None (the trainer's own loop); dask shards every pass over
        # Prefect's DaskTaskRunner and merges the moment states exactly.
        with shard_runner_scope(p.phase1.sharding, dm) as shard_runner:
            trainer = phase1_trainer(p, pipeline, dm, shard_runner)
            report = trainer.fit()
        scores = {k: float(v) for k, v in trainer.validate().items()}
        fits.append((mode, pipeline, trainer, report, scores))
    mode_ap = {m: v.get("metrics_anomaly/ap", float("nan")) for m, _, _, _, v in fits}
    mode, pipeline, trainer, report, val = max(
        fits, key=lambda f: (math.isfinite(mode_ap[f[0]]), mode_ap[f[0]])
    )
    if len(fits) > 1:
        log.info("selector_mode auto: Phase-1 val AP %s -> %s", mode_ap, mode)
    quality: dict[str, float] = {}
    if p.phase1.init_check != "off":
        # The guide's "validate initialization quality", in its correct form for RX: held-out
        # normal pixels score about C on average (nodes/training/quality.py). refuse stops the run
        # here.
        checks = trainer.check_initialization("val", strict=p.phase1.init_check == "refuse")
        for q in checks.values():
            quality.update(q.to_metrics())
            for why in q.reasons:
                (log.warning if p.phase1.init_check == "warn" else log.info)(
                    "Phase-1 initialization of %s: %s", q.node, why
                )
    states = state_store_dir(ctx)
    staging = states / f".staging-{uuid.uuid4().hex}"
    try:
        info = save_init_state(
            pipeline,
            staging / STATE_FILE,
            source_data_hash=data.data_hash,
            fit_report=report,
            record_time=False,  # content-addressed: same fit, same hash (MLflow has the time)
            extra={
                "params_phase1": p.phase1.to_dict(),
                "params_pipeline": p.pipeline.to_dict(),
                "val_metrics": val,
                "init_quality": quality,
                "selector_mode": mode,
                "selector_mode_val_ap": mode_ap,
            },
        )
        state_hash = version_init_state(
            staging, root=Path(ctx.root), remote=p.dvc.remote, states_dir=states
        )
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    ref = InitStateRef(
        state_hash=state_hash,
        source_data_hash=data.data_hash,
        pixel_count=info.pixel_count,
        passes=report.passes,
        seconds=report.seconds,
        val_metrics=val,
    )
    cache_put(ctx, key, ref)
    return ref


def _refuse_or_repair(ctx: RunContext, data: DataRef, dm: CubeDataModule, p: Any) -> Any:
    """``p``, or ``p`` with the stated ridge as ``pipeline.eps`` (``phase1.degenerate: ridge``)."""
    from tasks.steps.degenerate import check_statistics
    from tasks.steps.run import mlflow_client

    frames = ", ".join(data.frame_names[i] for i in data.train_ids)
    eps = check_statistics(
        stream_moments(dm, p.phase1.normal_only),
        frames=frames,
        policy=p.phase1.degenerate,
        ridge=p.phase1.ridge,
        eps=p.pipeline.eps,
    )
    if eps is None:
        return p
    log.warning("Phase 1: degenerate training statistics repaired with a ridge eps=%g", eps)
    if ctx.run_id is not None:
        mlflow_client().log_param(ctx.run_id, "phase1/ridge_eps", f"{eps:.6g}")
    return p.replace(pipeline=p.pipeline.replace(eps=eps))


def stream_moments(dm: CubeDataModule, normal_only: bool) -> Any:
    """Raw-band moments of the training frames in one streaming pass (same pixels as Phase 1)."""
    from nodes.training.stats import MomentAccumulator

    acc: MomentAccumulator | None = None
    for batch in dm.train_dataloader():
        cube = batch["cube"]
        pixels = cube.reshape(-1, cube.shape[-1])
        if normal_only:
            pixels = pixels[~batch["mask"].reshape(-1)]
        if acc is None:
            acc = MomentAccumulator(int(cube.shape[-1]))
        acc.update(pixels)
    if acc is None:
        raise ConfigError("drift check: the training split yielded no batch")
    return acc.finalize()
