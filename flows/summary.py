"""What ``cubeline run`` / ``train`` print when they finish: the run summary, for people."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _mlflow_ui(tracking_uri: str | None, root: Path) -> str:
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        return uri  # a tracking server is its own UI
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _prefect_where() -> str:
    api = os.environ.get("PREFECT_API_URL", "")
    if api:
        return f"UI: {api.removesuffix('/').removesuffix('/api')} (flow runs, task runs, cache)"
    return (
        "temporary API server (its history ends with the run); to keep it: "
        "prefect server start --host 127.0.0.1, export PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


def flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, when a server (not the temporary one) is used."""
    api = os.environ.get("PREFECT_API_URL", "")
    if not api or not flow_run_id:
        return None
    return f"{api.rstrip('/').removesuffix('/api')}/runs/flow-run/{flow_run_id}"


def print_summary(summary: Any, seconds: float) -> None:
    """Print a :class:`tasks.steps.RunSummary` for people."""
    s = summary
    root = Path(s.ctx.root)
    if s.data.version:
        data_state = "data version (cubeline ingest)"
    else:
        data_state = "dirty: differs from data.dvc" if s.data.dirty else "as recorded in data.dvc"
    h, w, c = s.data.shape
    split = s.data.split_names
    lines = [
        f"cubeline {s.flow}: finished in {seconds:.1f} s",
        f"  why         {s.ctx.reason}",
        f"  data        {s.data.data_hash} ({data_state}); {s.data.num_frames} frames "
        f"{h}x{w}x{c}; train {split['train']} val {split['val']} test {split['test']}",
    ]
    if s.drift is not None:
        reason = s.drift.reason
        if not reason.startswith(("drift", "no drift")):
            reason = f"{'DRIFT' if s.drift.drifted else 'no drift'}: {reason}"
        lines.append(f"  drift       {reason}")
    lines.append(f"  phase 1     {s.phase1}: {s.phase1_reason}; init state {s.state_hash} (DVC)")
    if s.unchanged_version is not None:
        lines.append(
            f"  model       unchanged: version {s.unchanged_version} (same data, params, Phase-1 "
            "state and code; Phase 2 skipped, nothing registered)"
        )
    else:
        reg, m = s.registration, s.evaluation.metrics
        champ = s.champion_metrics
        lines += [
            f"  phase 2     {s.train.epochs} epochs in {s.train.seconds:.1f} s; decision "
            f"threshold (logit) {_fmt(s.train.threshold)}",
            "  test        "
            + "  ".join(f"{k.split('/')[-1]} {_fmt(v)}" for k, v in sorted(m.items())),
        ]
        if champ:
            lines.append(
                "  champion    "
                + "  ".join(f"{k.split('/')[-1]} {_fmt(v)}" for k, v in sorted(champ.items()))
                + f" (v{reg.previous_champion_version}, same test frames)"
            )
        lines += [
            f"  model       {reg.model_name} version {reg.version} -> alias {reg.alias}",
            f"  gate        {reg.reason}",
            f"  champion    version {reg.champion_version} (before: "
            f"{reg.previous_champion_version})",
        ]
    url = flow_run_url(s.ctx.flow_run_id)
    lines += [
        f"  MLflow      run {s.ctx.run_id} in {s.ctx.tracking_uri}",
        f"              UI: {_mlflow_ui(s.ctx.tracking_uri, root)} (Experiments > "
        "cubeline > Runs; models: Models > registry)",
        f"  files       {s.ctx.run_dir}",
        f"  Prefect     {url or _prefect_where()}",
    ]
    print("\n".join(lines))
