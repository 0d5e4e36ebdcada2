"""Runs left RUNNING by a dead process are closed as KILLED by the next command opening the store.

A run records the host, pid and that process's start time (``cubeline.host``, ``cubeline.pid``,
``cubeline.pid_started``). One still RUNNING whose process no longer exists on this host -- or
whose pid now belongs to a process started later -- was ended by a kill (SIGKILL, OOM, power
loss) before it could close itself. Runs of other hosts are left alone (their processes cannot be
checked from here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

from tasks.env import process_alive

log = logging.getLogger(__name__)

TAG_HOST = "cubeline.host"
TAG_PID = "cubeline.pid"
TAG_PID_STARTED = "cubeline.pid_started"


def process_started(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (empty if unknown)."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return ""


def owner_tags() -> dict[str, str]:
    """The tags that let a later command tell whether this process is gone."""
    pid = os.getpid()
    return {
        TAG_HOST: socket.gethostname(),
        TAG_PID: str(pid),
        TAG_PID_STARTED: process_started(pid),
    }


def _dead(tags: dict[str, str]) -> int | None:
    try:
        pid = int(tags.get(TAG_PID, ""))
    except ValueError:
        return None
    if pid == os.getpid():
        return None
    if not process_alive(pid):
        return pid
    started = tags.get(TAG_PID_STARTED, "")
    if started and process_started(pid) not in ("", started):
        return pid  # the pid was reused by a later process
    return None


def reconcile_dead_runs() -> list[str]:
    """Mark KILLED the runs of the active experiment left RUNNING by a process that is gone.

    Returns:
        The ids of the runs marked KILLED.
    """
    import mlflow
    from mlflow.tracking.fluent import _get_experiment_id

    client = mlflow.MlflowClient()
    experiment_id = _get_experiment_id()
    if not experiment_id:
        return []
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'",
    )
    killed = []
    for run in runs:
        pid = _dead(run.data.tags)
        if pid is None:
            continue
        client.set_tag(
            run.info.run_id,
            "cubeline.outcome",
            f"killed: process {pid} on {host} ended without closing the run (marked KILLED by "
            f"process {os.getpid()})",
        )
        client.set_terminated(run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
    if killed:
        log.warning("marked KILLED %d run(s) left RUNNING by dead processes: %s", len(killed),
                    killed)
    return killed
