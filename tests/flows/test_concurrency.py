"""Two ``cubeline run`` processes at once on one repository end with exactly one champion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flows.loop import cubeline_env

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_two_concurrent_retrains_leave_one_champion(
    repo_copy: Path, prefect_server: str, tmp_path: Path
) -> None:
    import mlflow

    from tasks.registry import champion_history

    env = cubeline_env(prefect_server, tmp_path / "h")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--json", "--reason", f"concurrent {i}"],
            cwd=repo_copy,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"{out}\n{err}"

    uri = f"sqlite:///{repo_copy / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    name = "cubeline-channel-selector"
    # Same data, params, Phase-1 state (content-addressed) and code: one model, registered once.
    # The second registration finds the first one's fingerprint under the registry lock.
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    experiment = client.get_experiment_by_name("cubeline")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`cubeline.flow` = 'retrain'"
    )
    lineage = [{k: v for k, v in r.data.tags.items() if k.startswith("cubeline.")} for r in runs]
    assert versions == [1], f"two fingerprints; the runs' lineage tags: {lineage}"
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(str(s["unchanged_version"]) for s in summaries) == ["1", "None"]
    aliases = client.get_registered_model(name).aliases
    assert str(aliases["champion"]) == "1"
    assert [h.version for h in champion_history(name)] == ["1"]
    # Each run's initialization state is checked out under the hash its MLflow run records
    # (two fits of the same data at once: one content-addressed state).
    recorded = {r.data.tags["cubeline.init_state_hash"].removesuffix(".dir") for r in runs}
    states = {s.name for s in (repo_copy / "outputs" / "states").iterdir()}
    assert recorded == states and len(recorded) == 1
