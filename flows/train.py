"""The ``train`` flow: two-phase training from scratch, registered behind the gate."""

from __future__ import annotations

from prefect import flow

from tasks.steps import (
    RunSummary,
    evaluate,
    fit_statistics,
    gradient_train,
    load_cubes,
    register_model,
    tracked_run,
    unfreeze,
)


@flow(name="train", version="1", log_prints=False, persist_result=False)
def train(params_path: str | None = None, reason: str = "manual train") -> RunSummary:
    """Phase 1 on the data (cached while data and params stay), Phase 2, evaluate, register.

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        reason: Why it runs (kept in MLflow and in the registry).
    """
    with tracked_run(params_path, "train", reason) as ctx:
        data = load_cubes(ctx)
        fitted = fit_statistics(ctx, data, return_state=True)
        init = fitted.result()
        pipe = unfreeze(ctx, data, init.state_hash, reused=False)
        trained = gradient_train(ctx, data, pipe)
        evaluation = evaluate(ctx, data, trained)
        registration = register_model(ctx, data, trained, evaluation)
        return RunSummary(
            flow="train",
            ctx=ctx,
            data=data,
            state_hash=init.state_hash,
            phase1="cached" if fitted.name == "Cached" else "fitted",
            drift=None,
            train=trained,
            evaluation=evaluation,
            registration=registration,
        )
