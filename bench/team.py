"""The team scenario end to end, timed: stack up, two clones + a worker, fresh-clone restore, down.

1. ``cubeline run`` once in a fresh clone on the embedded defaults (``seconds_embedded``);
2. ``cubeline stack up`` in a temporary folder (``stack_startup_s``): PostgreSQL, the MLflow and
   Prefect servers, a process work pool with two workers, a shared DVC remote;
3. clones A and B join; B ingests the bundled scenes with a SIMULATED illumination change as a
   second data version; A registers the work-pool deployments with a cron due within ~2 min;
4. ``cubeline run`` in A (``seconds_team_concurrent``) and ``cubeline run --data-version`` in B
   at once, while a worker runs the scheduled retrain;
5. the MLflow server, the registry and the champion history are read back; a third fresh clone
   restores B's data version and the champion's Phase-1 state from the shared remote;
6. one ``cubeline run`` alone against the stack in a fresh clone (``seconds_team``, the same
   work as ``seconds_embedded``: a fresh clone, Phase 1 fitted, Phase 2, registration);
7. ``cubeline stack down``; no process or port may be left.

The scenario is ``tests/flows/team.py`` (also run by ``tests/flows/test_stack.py``). Progress on
stderr, one JSON object on the last line of stdout. Needs PostgreSQL 15 and ~5 minutes.

    .venv/bin/python -m bench.team
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tasks.env import cpu_model, disable_telemetry
from tests.flows.team import embedded_run, scenario, stack_parent


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0]).parse_args()
    disable_telemetry()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cubeline-bench-team-"))
    parent = stack_parent()
    try:
        print("one cubeline run on the embedded defaults ...", file=sys.stderr)
        seconds_embedded = embedded_run(work)
        print("team scenario (stack up, two clones + a worker, restore, down) ...",
              file=sys.stderr)
        out = scenario(work, parent / "stack", lone_run=True)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "runs_recorded": out["runs_recorded"],
        "champions": out["champions"],
        "history_in_order": out["history_in_order"],
        "restored_in_fresh_clone": out["restored_in_fresh_clone"],
        "seconds_embedded": seconds_embedded,
        "seconds_team": out["seconds_team_alone"],
        "seconds_team_concurrent": out["seconds_team"],
        "seconds_team_concurrent_both": out["seconds_team_both"],
        "stack_startup_s": out["stack_startup_s"],
        "stack_down_s": out["stack_down_s"],
        "scheduled_run_state": out["scheduled_run_state"],
        "reasons": out["reasons"],
        "processes_left": out["processes_left"],
        "total_s": round(time.monotonic() - t0, 1),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
