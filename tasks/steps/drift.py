"""Steps ``drift_check`` and ``emit_drift_event``.

``drift_check`` compares new frames with the champion's training statistics;
``emit_drift_event`` sends the Prefect event that triggers a retrain.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from prefect import task

if TYPE_CHECKING:

    pass
from tasks.steps.base import DRIFT_EVENT, STEP_VERSIONS, DataRef, DriftResult, RunContext
from tasks.steps.data import restore_state, run_datamodule
from tasks.steps.fit import stream_moments
from tasks.steps.run import log_run_artifact, log_run_metrics, mlflow_client


@task(name="drift_check", version=STEP_VERSIONS["drift_check"], persist_result=False)
def drift_check(ctx: RunContext, data: DataRef) -> DriftResult:
    """Compare the data's statistics with the champion's initialization state.

    One streaming pass over the training frames; the reference is the raw-band moments stored
    in the champion's DVC-versioned state (no second copy of the reference data). Writes a JSON
    report and a per-band plot and logs them to the run.

    Returns:
        ``reinitialize=True`` when drift is found or there is no champion to compare with.

    Raises:
        DataValidationError: The frames have another band count than the champion's state.
    """
    from nodes.training.drift import compare_moments, plot_drift_report
    from nodes.training.init_state import read_init_info, read_init_moments
    from tasks.registry import CHAMPION, get_alias_version
    from tasks.tracking import TAG_INIT_STATE_HASH

    p = ctx.params
    champion = get_alias_version(p.registry.model_name, CHAMPION)
    if champion is None:
        return DriftResult(
            reinitialize=True,
            drifted=False,
            reason=f"no champion of {p.registry.model_name!r} yet: nothing to compare with, "
            "Phase 1 initializes from the data",
            data_version=data.version,
        )
    run = mlflow_client().get_run(champion.run_id) if champion.run_id else None
    state_hash = run.data.tags.get(TAG_INIT_STATE_HASH) if run is not None else None
    if not state_hash:
        return DriftResult(
            reinitialize=True,
            drifted=False,
            reason=f"champion version {champion.version} records no initialization state "
            f"(tag {TAG_INIT_STATE_HASH}): Phase 1 initializes from the data",
            champion_version=str(champion.version),
            data_version=data.version,
            champion_run_id=champion.run_id,
        )
    state_path = restore_state(ctx, state_hash)
    reference = read_init_moments(state_path)
    current = stream_moments(run_datamodule(ctx, data), p.phase1.normal_only)
    report = compare_moments(reference, current, p.drift.thresholds())
    # A state fitted under other pipeline/Phase-1 params does not fit this pipeline, drift or not.
    fitted_with = read_init_info(state_path).extra
    changed = [
        name
        for name in ("pipeline", "phase1")
        if fitted_with.get(f"params_{name}") != getattr(p, name).to_dict()
    ]
    reason = report.reason
    if changed:
        reason += (
            f"; the champion's state was fitted with other params.yaml {' and '.join(changed)} "
            "settings: Phase 1 runs again"
        )
    out = ctx.out / "drift"
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "drift_report.json"
    from tasks.env import atomic_write_bytes

    atomic_write_bytes(report_path, (
        json.dumps(
            {
                **report.to_dict(),
                "champion_version": str(champion.version),
                "reference_state_hash": state_hash,
                "data_hash": data.data_hash,
            },
            indent=2,
        )
    ).encode())
    plot_path = plot_drift_report(
        report,
        out / "drift_bands.png",
        title=f"data {data.data_hash[:8]} vs champion v{champion.version}",
    )
    log_run_artifact(ctx, report_path, "drift")
    log_run_artifact(ctx, plot_path, "drift")
    log_run_metrics(ctx, {c.name: c.value for c in report.criteria}, prefix="drift/")
    log_run_metrics(ctx, {"drifted": float(report.drifted)}, prefix="drift/")
    return DriftResult(
        reinitialize=report.drifted or bool(changed),
        drifted=report.drifted,
        reason=reason,
        fired=report.fired,
        drifted_bands=report.drifted_bands,
        champion_version=str(champion.version),
        reference_state_hash=state_hash,
        report_path=str(report_path),
        plot_path=str(plot_path),
        summary={
            **report.summary(),
            "criteria": [asdict(c) for c in report.criteria],
            "champion_version": str(champion.version),
        },
        data_version=data.version,
        champion_run_id=champion.run_id,
    )


@task(name="emit_drift_event", version=STEP_VERSIONS["emit_drift_event"], persist_result=False)
def emit_drift_event(ctx: RunContext, data: DataRef, result: DriftResult) -> str | None:
    """Emit ``cubeline.drift.detected`` for a data version (a deployment trigger starts retrain).

    The payload names the data version (its DVC hash: the triggered run restores it by that
    hash alone), the drift decision and its criteria, the report and the champion compared with.

    Returns:
        The event id, or None when Prefect did not accept it.
    """
    from prefect.events import emit_event

    event = emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"cubeline.data.{data.data_hash}",
            "prefect.resource.name": f"data {data.data_hash[:12]}",
        },
        payload={
            "data_version": data.version or "",
            "data_hash": data.data_hash,
            "drift": result.summary,
            "reason": result.reason,
            "fired": list(result.fired),
            "champion_version": result.champion_version,
            "report": result.report_path,
            "flow_run_id": ctx.flow_run_id,
        },
    )
    return str(event.id) if event is not None else None
