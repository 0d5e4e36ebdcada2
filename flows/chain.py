"""The chain of steps that ``train`` and ``retrain`` share once Phase 1 is settled.

Called inside a flow: unchanged check → unfreeze → Phase 2 → evaluate → register → outcome.
"""

from __future__ import annotations

from tasks.outcome import publish_outcome
from tasks.steps import (
    DataRef,
    DriftResult,
    RunContext,
    RunSummary,
    evaluate,
    find_unchanged,
    fingerprint,
    gradient_train,
    register_model,
    unfreeze,
)


def phase2_and_register(
    flow: str,
    ctx: RunContext,
    data: DataRef,
    state_hash: str,
    phase1: str,
    phase1_reason: str,
    drift: DriftResult | None,
) -> RunSummary:
    """Train from ``state_hash`` on ``data`` and register the result, unless nothing changed.

    Args:
        flow: Flow name.
        ctx: Run context.
        data: The data version trained on.
        state_hash: Phase-1 state (fitted, cached or the champion's).
        phase1: ``fitted`` / ``cached`` / ``reused``.
        phase1_reason: Why.
        drift: The drift check (retrain), else None.

    Returns:
        The run summary (also published as the flow run's markdown artifact).
    """
    fp = fingerprint(ctx, data, state_hash)  # computed once: it runs git on the code
    same = find_unchanged(ctx, fp)
    if same is not None:
        summary = RunSummary(
            flow=flow, ctx=ctx, data=data, state_hash=state_hash, phase1=phase1, drift=drift,
            train=None, evaluation=None, registration=None, phase1_reason=phase1_reason,
            unchanged_version=same,
        )
    else:
        pipe = unfreeze(ctx, data, state_hash, reused=phase1 == "reused")
        trained = gradient_train(ctx, data, pipe)
        evaluation = evaluate(ctx, data, trained)
        registration = register_model(ctx, data, trained, evaluation, phase1, fp)
        summary = RunSummary(
            flow=flow, ctx=ctx, data=data, state_hash=state_hash, phase1=phase1, drift=drift,
            train=trained, evaluation=evaluation, registration=registration,
            phase1_reason=phase1_reason, champion_metrics=registration.champion_metrics,
            # A concurrent run registered the same model while this one trained.
            unchanged_version=registration.version if registration.unchanged else None,
        )
    publish_outcome(summary)
    return summary
