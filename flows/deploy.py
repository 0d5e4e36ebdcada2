"""Deployments of cubeline, served by this process against a Prefect server.

``retrain`` runs on the cron of ``params.yaml`` and on the drift event; ``drift_watch`` runs on an
interval. ``prefect.serve`` registers both and executes their runs here.

Schedules and event triggers need a real API server: Prefect's temporary one refuses them
("Cannot schedule flows on an ephemeral server"). Start one on loopback first::

    prefect server start --host 127.0.0.1 --port 4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    cubeline serve

The trigger is what makes re-initialization drift-driven end to end: ``drift_watch`` emits
``cubeline.drift.detected`` naming a data version, and the automation created for the ``retrain``
deployment starts a run with ``data_version`` and ``event_id`` rendered from the event (Prefect
renders Jinja templates in trigger parameters): that run trains on exactly that version. Why a
run happened is read from Prefect's record of it (``tasks.steps.describe_trigger``), never from
a fixed deployment parameter, so a manual ``prefect deployment run`` is not called a schedule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from nodes.errors import ConfigError
from tasks.params import load_params
from tasks.steps import DRIFT_EVENT

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

RETRAIN_DEPLOYMENT = "retrain-scheduled"
SERVE_POLL_S = 2.0
WATCH_DEPLOYMENT = "drift-watch"


def build_deployments(params_path: Path) -> list[RunnerDeployment]:
    """The two deployments, bound to the repository of ``params_path``.

    Args:
        params_path: Absolute path of ``params.yaml``.

    Returns:
        ``[retrain (cron + drift trigger), drift_watch (interval)]``.
    """
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    from flows import for_repo
    from flows.drift_watch import drift_watch
    from flows.retrain import retrain

    params = load_params(params_path)
    root = params_path.parent
    sched = params.schedule
    common: dict[str, Any] = {"params_path": str(params_path)}
    on_drift = DeploymentEventTrigger(
        name="retrain-on-drift",
        description="drift_watch found drift: re-initialize and retrain",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": "cubeline.data.*"},
        parameters={
            **common,
            "data_version": "{{ event.payload.data_version }}",
            "event_id": "{{ event.id | string }}",  # a UUID: tojson needs a str
        },
    )
    retrain_dep = for_repo(retrain, root).to_deployment(
        name=RETRAIN_DEPLOYMENT,
        schedules=[Cron(sched.retrain_cron, timezone=sched.timezone)],
        parameters=common,
        triggers=[on_drift],
        tags=["cubeline"],
        description="Drift check, re-initialization on drift, Phase 2, gated promotion.",
    )
    watch_dep = for_repo(drift_watch, root).to_deployment(
        name=WATCH_DEPLOYMENT,
        schedules=[Interval(sched.drift_watch_interval_s)],
        parameters=common,
        tags=["cubeline"],
        description="Ingests the inbox's new frames as a data version, checks it for drift; "
        "emits cubeline.drift.detected naming the version.",
    )
    # to_deployment is sync/async dual; called from sync code it returns the deployment.
    return [cast("RunnerDeployment", retrain_dep), cast("RunnerDeployment", watch_dep)]


def check_server() -> str:
    """Return ``PREFECT_API_URL`` after checking that it names a reachable server.

    Raises:
        ConfigError: Unset (schedules need a real server), or the server does not answer.
    """
    import urllib.error
    import urllib.request

    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise ConfigError(
            "cubeline serve needs a Prefect server (schedules do not run on the temporary one). "
            "Start one with `prefect server start --host 127.0.0.1 --port 4200` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({exc}); start it "
            "with `prefect server start --host 127.0.0.1 --port 4200`"
        ) from None
    return url


def serve(params_path: Path) -> None:
    """Register the deployments and run their flows in this process until interrupted."""
    from prefect import serve as prefect_serve

    from tasks.lifecycle import bound_runner_shutdown

    check_server()
    bound_runner_shutdown()  # SIGTERM stops it within seconds, even with the API gone
    # Poll for due runs every 2 s (Prefect's default is 10 s): a drift-triggered retrain starts
    # seconds after the event; the cost is one small API query per poll.
    prefect_serve(*build_deployments(params_path), query_seconds=SERVE_POLL_S)
