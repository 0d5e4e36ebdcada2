"""What a flow run did, where the user looks: a Prefect artifact, a terminal line, a tag.

The artifact (key ``<flow>-outcome``) is on the flow run's page in the Prefect UI: the data
version, the drift decision and its criteria, whether Phase 1 was fitted, cached or reused and
why, the metrics beside the champion's on the same frames, the gate's decision, the version and
its alias. Served and worker runs also print one line to their terminal (:func:`outcome_line`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.steps import DriftResult, RunContext, RunSummary

log = logging.getLogger(__name__)

TAG_OUTCOME = "cubeline.outcome"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return "—" if value is None else str(value)


def outcome_line(s: RunSummary) -> str:
    """One line: data, drift, Phase 1, the gate's figure against the champion, the version."""
    data = s.data.version or s.data.data_hash
    drift = "" if s.drift is None else f"drift {'yes' if s.drift.drifted else 'no'}, "
    head = f"cubeline {s.flow} [{s.ctx.reason}]: data {data[:12]}, {drift}phase 1 {s.phase1}"
    if s.unchanged_version is not None:
        return f"{head}; unchanged: version {s.unchanged_version} (nothing registered)"
    assert s.registration is not None and s.evaluation is not None
    reg = s.registration
    metric = _gate_metric(s)
    champ = s.champion_metrics.get(metric)
    vs = f" vs champion {_fmt(champ)}" if champ is not None else ""
    return (
        f"{head}; test {metric.split('/')[-1]} {_fmt(s.evaluation.metrics.get(metric))}{vs}; "
        f"version {reg.version} -> {reg.alias} ({reg.reason})"
    )


def _gate_metric(s: RunSummary) -> str:
    try:
        return str(s.ctx.params.registry.gate.metric)
    except Exception:
        return "metrics_anomaly/auroc"


def outcome_markdown(s: RunSummary) -> str:
    """The flow run's outcome as markdown (the Prefect artifact)."""
    d = s.data
    lines = [
        f"# cubeline {s.flow}: {_headline(s)}",
        "",
        f"**Why it ran:** {s.ctx.reason}",
        "",
        "## Data",
        f"- version: `{d.version or d.data_hash}`"
        + (" (a `cubeline ingest` data version)" if d.version else " (params.yaml data, data.dvc)"),
        f"- frames: train {d.split_names['train']}, val {d.split_names['val']}, "
        f"test {d.split_names['test']}",
        "",
    ]
    if s.drift is not None:
        lines += ["## Drift check", *_drift_lines(s.drift), ""]
    lines += [
        "## Phase 1",
        f"- **{s.phase1}**: {s.phase1_reason}",
        f"- initialization state: `{s.state_hash}` (DVC)",
        "",
    ]
    if s.unchanged_version is not None:
        lines += [
            "## Registry",
            f"- **unchanged: version {s.unchanged_version}** holds this exact model (same data, "
            "params, Phase-1 state and code): Phase 2 skipped, nothing registered",
        ]
        return "\n".join(lines) + "\n"
    assert s.train is not None and s.evaluation is not None and s.registration is not None
    reg = s.registration
    lines += [
        "## Phase 2",
        f"- {s.train.epochs} epochs in {s.train.seconds:.1f} s; decision threshold (logit) "
        f"{_fmt(s.train.threshold)}",
        "",
        f"## Test metrics (pinned split `{s.evaluation.split_id}`)",
        "| metric | this run | champion before |",
        "|---|---|---|",
    ]
    for k, v in sorted(s.evaluation.metrics.items()):
        lines.append(f"| {k} | {_fmt(v)} | {_fmt(s.champion_metrics.get(k))} |")
    lines += [
        "",
        "## Gate and registry",
        f"- decision: **{'promote' if reg.promoted else 'keep the champion'}** — {reg.reason}",
        f"- `{reg.model_name}` version **{reg.version}** → alias **{reg.alias}**; champion now "
        f"v{reg.champion_version} (before: v{reg.previous_champion_version})",
        f"- MLflow run `{s.ctx.run_id}`",
    ]
    return "\n".join(lines) + "\n"


def _headline(s: RunSummary) -> str:
    if s.unchanged_version is not None:
        return f"unchanged (version {s.unchanged_version})"
    assert s.registration is not None
    reg = s.registration
    return f"version {reg.version} → {reg.alias}"


def _drift_lines(r: DriftResult) -> list[str]:
    lines = [f"- decision: **{'drift' if r.drifted else 'no drift'}** — {r.reason}"]
    for c in r.summary.get("criteria", []):
        mark = "fired" if c["fired"] else "ok"
        lines.append(f"  - {c['name']}: {_fmt(float(c['value']))} (threshold "
                     f"{_fmt(float(c['threshold']))}) {mark}")
    if r.champion_version:
        lines.append(f"- compared with: champion v{r.champion_version}'s Phase-1 statistics")
    if r.event_id:
        lines.append(f"- event `{r.event_id}` (cubeline.drift.detected) emitted")
    return lines


def _publish(ctx: RunContext, key: str, markdown: str, line: str, description: str) -> None:
    """Artifact on the flow run, tag on the MLflow run, one line on a served run's terminal."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from tasks.steps import set_run_tags

    with contextlib.suppress(Exception):  # no API (plain call): nothing to attach it to
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    set_run_tags(ctx, {TAG_OUTCOME: line[:5000]})
    fr = FlowRunContext.get()
    if fr is not None and fr.flow_run is not None and fr.flow_run.deployment_id is not None:
        print(line, flush=True)


def publish_outcome(s: RunSummary) -> None:
    """Publish a ``train``/``retrain`` run's outcome (artifact, MLflow tag, served line)."""
    _publish(s.ctx, f"{s.flow}-outcome", outcome_markdown(s), outcome_line(s),
             f"cubeline {s.flow}: {_headline(s)}")


def drift_line(ctx: RunContext, r: DriftResult) -> str:
    """One line for a drift_watch run."""
    data = (r.data_version or "")[:12] or "none"
    event = f"; event {r.event_id} emitted" if r.event_id else ""
    return f"cubeline drift_watch [{ctx.reason}]: data {data}: " + (
        f"DRIFT ({r.reason}){event}" if r.drifted else f"no drift ({r.reason})"
    )


def publish_drift_outcome(ctx: RunContext, r: DriftResult) -> None:
    """Publish a ``drift_watch`` run's outcome."""
    md = "\n".join(
        ["# cubeline drift_watch", "", f"**Why it ran:** {ctx.reason}", "",
         f"- data version: `{r.data_version or 'none'}`", *_drift_lines(r)]
    )
    _publish(ctx, "drift-watch-outcome", md + "\n", drift_line(ctx, r), "drift check")
