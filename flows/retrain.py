"""The ``retrain`` flow: drift check, re-initialization on drift, Phase 2, gated promotion.

It trains on one data version: ``params.yaml`` data, or the version a drift event named.
"""

from __future__ import annotations

from prefect import flow

from flows.chain import phase2_and_register
from tasks.steps import (
    RunSummary,
    combine_data,
    drift_check,
    fit_statistics,
    load_cubes,
    record_data,
    tracked_run,
)


@flow(name="retrain", version="2", log_prints=False, persist_result=False)
def retrain(
    params_path: str | None = None,
    reason: str = "",
    data_version: str | None = None,
    event_id: str | None = None,
) -> RunSummary:
    """Drift check → Phase 1 on drift (else the champion's state) → train → register.

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        reason: The operator's note on why it runs; the trigger itself (manual, schedule,
            drift event) is read from Prefect's record of the run.
        data_version: Data version to train on (``cubeline ingest``; the drift event passes
            it); None: ``params.yaml`` ``data``.
        event_id: The drift event that triggered the run (passed by the deployment trigger).
    """
    with tracked_run(
        params_path, "retrain", reason, event_id=event_id, data_version=data_version
    ) as ctx:
        data = load_cubes(ctx, data_version or None)
        record_data(ctx, data)
        check = drift_check(ctx, data)
        if check.drifted and ctx.params.retrain.on_drift_data == "old_and_new":
            data = combine_data(ctx, data, check.champion_run_id)
            record_data(ctx, data)
        if check.reinitialize or check.reference_state_hash is None:
            fitted = fit_statistics(ctx, data)
            state_hash = fitted.state_hash
            if check.champion_version is None or check.reference_state_hash is None:
                why = "no champion state to start from: initialized from this data"
            elif check.drifted:
                why = (f"drift against champion v{check.champion_version}: re-initialized on "
                       "this data")
            else:
                why = (f"champion v{check.champion_version}'s state was fitted with other "
                       "params: re-initialized on this data")
            if fitted.cached:
                phase1 = "cached"
                why += " (an earlier fit of the same data and params was reused)"
            else:
                phase1 = "fitted"
        else:
            state_hash, phase1 = check.reference_state_hash, "reused"
            why = f"no drift against champion v{check.champion_version}: its state reused"
            if event_id:
                why += (
                    f" -- NOTE: drift event {event_id} reported drift, but this run's check "
                    "found none against the current champion"
                )
        return phase2_and_register("retrain", ctx, data, state_hash, phase1, why, check)
