"""The ``retrain`` flow: drift-triggered re-initialization, then Phase 2 and promotion."""

from __future__ import annotations

from prefect import flow

from tasks.steps import (
    RunSummary,
    drift_check,
    evaluate,
    fit_statistics,
    gradient_train,
    load_cubes,
    register_model,
    tracked_run,
    unfreeze,
)


@flow(name="retrain", version="1", log_prints=False, persist_result=False)
def retrain(params_path: str | None = None, reason: str = "manual retrain") -> RunSummary:
    """Drift check → Phase 1 only on drift (else the champion's state) → train → register.

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        reason: Why it runs (schedule, drift event, manual), kept in MLflow and the registry.
    """
    with tracked_run(params_path, "retrain", reason) as ctx:
        data = load_cubes(ctx)
        check = drift_check(ctx, data)
        if check.reinitialize or check.reference_state_hash is None:
            fitted = fit_statistics(ctx, data, return_state=True)
            state_hash = fitted.result().state_hash
            phase1 = "cached" if fitted.name == "Cached" else "fitted"
        else:
            state_hash, phase1 = check.reference_state_hash, "reused"
        pipe = unfreeze(ctx, data, state_hash, reused=phase1 == "reused")
        trained = gradient_train(ctx, data, pipe)
        evaluation = evaluate(ctx, data, trained)
        registration = register_model(ctx, data, trained, evaluation)
        return RunSummary(
            flow="retrain",
            ctx=ctx,
            data=data,
            state_hash=state_hash,
            phase1=phase1,
            drift=check,
            train=trained,
            evaluation=evaluation,
            registration=registration,
        )
