"""The ``drift_watch`` flow: new frames → a data version → drift check → an event on drift."""

from __future__ import annotations

from prefect import flow

from tasks.outcome import publish_drift_outcome
from tasks.steps import (
    DriftResult,
    drift_check,
    emit_drift_event,
    ingest_inbox,
    load_cubes,
    record_data,
    tracked_run,
)


@flow(name="drift_watch", version="2", log_prints=False, persist_result=False)
def drift_watch(params_path: str | None = None, data_version: str | None = None) -> DriftResult:
    """Compare a data version with the champion's statistics; emit ``cubeline.drift.detected``.

    The event names the data version; the ``retrain`` deployment's trigger passes it (and the
    event id) to the run it starts (see :mod:`flows.deploy`).

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        data_version: The version to check; None ingests the frames waiting in
            ``params.yaml`` ``ingest.inbox`` first (nothing there: nothing to check).
    """
    with tracked_run(params_path, "drift_watch", data_version=data_version) as ctx:
        version = data_version or ingest_inbox(ctx)
        if not version:
            result = DriftResult(
                reinitialize=False,
                drifted=False,
                reason=f"no new frames in the inbox ({ctx.params.ingest.inbox}): nothing to check",
            )
        else:
            data = load_cubes(ctx, version)
            record_data(ctx, data)
            result = drift_check(ctx, data)
            if result.drifted:
                event_id = emit_drift_event(ctx, data, result)
                result = DriftResult(**{**result.__dict__, "event_id": event_id})
        publish_drift_outcome(ctx, result)
        return result
