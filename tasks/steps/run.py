"""The MLflow run of a flow run: opening and closing it, its tags, why it ran, dead runs.

A flow run is one MLflow run, opened by :func:`tracked_run` (params flattened, tags) and closed
FINISHED or FAILED; tasks log into it by its id.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.errors import ConfigError
from tasks.env import repo_root
from tasks.params import Params, load_params

if TYPE_CHECKING:

    pass
from tasks.steps.base import RunContext
from tasks.tracking.reconcile import owner_tags

log = logging.getLogger(__name__)


def mlflow_client() -> Any:
    """An MLflow client for the configured tracking store."""
    import mlflow

    return mlflow.MlflowClient()


def log_run_metrics(ctx: RunContext, metrics: Mapping[str, float], prefix: str = "") -> None:
    """Log finite metrics into the flow run's MLflow run (no-op without one)."""
    if ctx.run_id is None:
        return

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(f"{prefix}{k}", float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    if batch:
        mlflow_client().log_batch(ctx.run_id, metrics=batch)


def log_run_artifact(ctx: RunContext, path: Path, artifact_path: str) -> None:
    """Log a file into the flow run's MLflow run (no-op without one)."""
    if ctx.run_id is not None:
        mlflow_client().log_artifact(ctx.run_id, str(path), artifact_path=artifact_path)


def set_run_tags(ctx: RunContext, tags: Mapping[str, str]) -> None:
    """Tag the flow's MLflow run (nothing outside :func:`tracked_run`)."""
    if ctx.run_id is None:
        return
    client = mlflow_client()
    for k, v in tags.items():
        client.set_tag(ctx.run_id, k, v)


def describe_trigger(
    params: Params,
    note: str = "",
    *,
    event_id: str | None = None,
    data_version: str | None = None,
) -> tuple[str, str]:
    """What started this flow run, as ``(trigger, reason)``, from Prefect's own record of it.

    ``drift event <id> on data <hash>`` when a drift event's trigger passed its id;
    ``schedule <cron or interval>`` only when the server's scheduler created the run
    (``auto_scheduled``); ``manual via deployment <name>`` for a deployment run someone asked for
    (UI, ``prefect deployment run``); ``manual`` otherwise. ``note`` (``--reason``) is appended.
    """
    from prefect.context import FlowRunContext

    fr = FlowRunContext.get()
    run = fr.flow_run if fr is not None else None
    if event_id:
        trigger, reason = "drift event", f"drift event {event_id} on data {data_version or '?'}"
    elif run is not None and run.deployment_id is not None:
        deployment = _deployment(run.deployment_id)
        name = deployment.name if deployment is not None else str(run.deployment_id)
        if run.auto_scheduled:
            trigger, reason = "schedule", f"schedule {_schedule_text(deployment, params)}"
        else:
            trigger, reason = "manual via deployment", f"manual via deployment {name}"
    else:
        trigger, reason = "manual", "manual"
    return trigger, f"{reason}: {note}" if note else reason


def _deployment(deployment_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_deployment(deployment_id)
    except Exception:
        log.warning("could not read deployment %s for the run's reason", deployment_id)
        return None


def _schedule_text(deployment: Any, params: Params) -> str:
    """The deployment's active schedule as text (``params.yaml`` ``schedule`` if unknown)."""
    for sched in getattr(deployment, "schedules", None) or []:
        if not getattr(sched, "active", True):
            continue
        inner = sched.schedule
        if getattr(inner, "cron", None):
            return f"{inner.cron} ({getattr(inner, 'timezone', None) or 'UTC'})"
        if getattr(inner, "interval", None) is not None:
            return f"every {int(inner.interval.total_seconds())} s"
        return str(inner)
    return f"{params.schedule.retrain_cron} ({params.schedule.timezone})"


@contextmanager
def tracked_run(
    params_path: str | Path | None,
    flow_name: str,
    note: str = "",
    *,
    event_id: str | None = None,
    data_version: str | None = None,
) -> Iterator[RunContext]:
    """Open the MLflow run of one flow run; yields the :class:`RunContext` the tasks take.

    Configures MLflow (default: ``<repo>/mlflow.db`` + ``<repo>/mlartifacts``), starts a run
    tagged with the flow and the Prefect flow-run id, logs every ``params.yaml`` value
    (flattened) and the params hash and git commit; ends the run FINISHED, or FAILED when the
    body raises.

    Args:
        params_path: ``params.yaml`` (None: the repository's).
        flow_name: Name of the flow (run name prefix, tag).
        note: The operator's words on why it runs (``--reason``), added to the trigger.
        event_id: The drift event that triggered it (deployment trigger parameter).
        data_version: The data version the event named.

    Raises:
        ConfigError: params.yaml is invalid (before any run is created).
        TrackingUnavailableError: The tracking store cannot be reached (fails fast).
    """
    import mlflow

    from tasks.tracking import (
        TAG_GIT_COMMIT,
        TAG_PARAMS_HASH,
        configure_mlflow,
        flatten_params,
        git_commit,
    )

    path = Path(params_path) if params_path else repo_root() / "params.yaml"
    path = (path / "params.yaml" if path.is_dir() else path).resolve()
    params = load_params(path)
    root = repo_root(path.parent)
    uri = configure_mlflow(
        params.mlflow.tracking_uri, root, experiment_name=params.mlflow.experiment
    )
    flow_run_id, flow_run_name = _prefect_flow_run()
    trigger, reason = describe_trigger(params, note, event_id=event_id, data_version=data_version)
    run = mlflow.start_run(
        run_name=f"{flow_name}-{flow_run_name or uuid.uuid4().hex[:8]}",
        tags={
            "cubeline.flow": flow_name,
            "cubeline.reason": reason[:5000],
            "cubeline.trigger": trigger,
            "cubeline.event_id": event_id or "",
            **owner_tags(),
            "prefect.flow_run_id": flow_run_id or "",
            TAG_PARAMS_HASH: params.section_hash(),
            TAG_GIT_COMMIT: git_commit(root),
        },
    )
    run_id = run.info.run_id
    run_dir = root / "outputs" / "runs" / run_id
    ctx = RunContext(
        str(path), str(root), run_id, str(run_dir), uri, reason, trigger, flow_run_id
    )
    try:
        flat = flatten_params(params.to_dict())
        mlflow.log_params(flat)
        yield ctx
    except BaseException as exc:
        from tasks.lifecycle import interrupted

        killed = interrupted(exc)
        mlflow.end_run("KILLED" if killed else "FAILED")
        raise
    mlflow.end_run("FINISHED")


def _prefect_flow_run() -> tuple[str | None, str | None]:
    from prefect.context import FlowRunContext

    fr = FlowRunContext.get()
    if fr is None or fr.flow_run is None:
        return None, None
    return str(fr.flow_run.id), fr.flow_run.name


def ensure_active_run(ctx: RunContext) -> None:
    """Make the flow's run active in this thread (``mlflow.pyfunc.log_model`` logs there)."""
    import mlflow

    active = mlflow.active_run()
    if ctx.run_id is None:
        raise ConfigError("register_model needs an MLflow run: call it inside tracked_run()")
    if active is None or active.info.run_id != ctx.run_id:
        mlflow.start_run(run_id=ctx.run_id)
