"""The ``train`` flow: two-phase training from scratch, registered behind the gate."""

from __future__ import annotations

from prefect import flow

from flows.chain import phase2_and_register
from tasks.steps import RunSummary, fit_statistics, load_cubes, record_data, tracked_run


@flow(name="train", version="2", log_prints=False, persist_result=False)
def train(
    params_path: str | None = None, reason: str = "", data_version: str | None = None
) -> RunSummary:
    """Phase 1 on the data (cached while data and params stay), Phase 2, evaluate, register.

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        reason: The operator's note on why it runs (kept in MLflow and in the registry).
        data_version: Data version to train on; None: ``params.yaml`` ``data``.
    """
    with tracked_run(params_path, "train", reason, data_version=data_version) as ctx:
        data = load_cubes(ctx, data_version or None)
        record_data(ctx, data)
        init = fit_statistics(ctx, data)
        cached = init.cached
        phase1 = "cached" if cached else "fitted"
        why = (
            "training from scratch; an earlier fit of the same data and params was reused"
            if cached
            else "training from scratch"
        )
        return phase2_and_register("train", ctx, data, init.state_hash, phase1, why, None)
