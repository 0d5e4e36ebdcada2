"""The ``drift_watch`` flow: one streaming pass over new frames, an event when they drifted."""

from __future__ import annotations

from prefect import flow

from tasks.steps import DriftResult, drift_check, emit_drift_event, load_cubes, tracked_run


@flow(name="drift_watch", version="1", log_prints=False, persist_result=False)
def drift_watch(params_path: str | None = None, paths: list[str] | None = None) -> DriftResult:
    """Compare new frames with the champion's statistics; emit ``cubeline.drift.detected``.

    A deployment trigger on that event starts ``retrain`` (see :mod:`flows.deploy`).

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        paths: Frames to check (default: ``drift.watch_paths``, else the training frames).
    """
    with tracked_run(params_path, "drift_watch", "drift watch") as ctx:
        watch = tuple(paths or ctx.params.drift.watch_paths) or None
        data = load_cubes(ctx, watch)
        result = drift_check(ctx, data)
        if result.drifted:
            emit_drift_event(ctx, data, result)
        return result
