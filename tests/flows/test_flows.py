"""Flows end to end: real Prefect runs, a real MLflow SQLite store and registry, a real DVC repo
(a temporary copy of this one, restored from its in-repo DVC remote).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import scipy.io

from flows import for_repo
from nodes.errors import DataValidationError
from tests.flows.helpers import FAST_PARAMS, copy_repo, edit_params, git

if TYPE_CHECKING:
    from mlflow import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _retrain(root: Path, reason: str = "test") -> object:
    from flows.retrain import retrain

    return for_repo(retrain, root)(params_path=str(root / "params.yaml"), reason=reason)


def _train(root: Path) -> object:
    from flows.train import train

    return for_repo(train, root)(params_path=str(root / "params.yaml"), reason="test train")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object, str]]:
    """One retrain run on a fresh repository copy: (root, summary, git status before)."""
    root = copy_repo(tmp_path_factory.mktemp("trained") / "repo")
    edit_params(root, **FAST_PARAMS)
    before = git(root, "status", "--porcelain")
    summary = _retrain(root, reason="first run")
    yield root, summary, before


def _mlflow(root: Path) -> MlflowClient:
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient()


def test_retrain_end_to_end(trained: tuple[Path, object, str]) -> None:
    from tasks.tracking import (
        TAG_DATA_HASH,
        TAG_GIT_COMMIT,
        TAG_INIT_STATE_HASH,
        TAG_PARAMS_HASH,
    )
    from tasks.versioning import read_dvc_file, restore_init_state

    root, s, _ = trained
    recorded, _ = read_dvc_file(root)
    assert s.data.data_hash == recorded and not s.data.dirty  # type: ignore[attr-defined]
    assert s.phase1 == "fitted"  # type: ignore[attr-defined]
    assert s.drift.reinitialize and "no champion" in s.drift.reason  # type: ignore[attr-defined]
    reg = s.registration  # type: ignore[attr-defined]
    assert (reg.version, reg.alias, reg.champion_version) == ("1", "champion", "1")

    client = _mlflow(root)
    run = client.get_run(s.ctx.run_id)  # type: ignore[attr-defined]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags[TAG_DATA_HASH] == recorded
    assert tags[TAG_INIT_STATE_HASH] == s.state_hash  # type: ignore[attr-defined]
    assert tags[TAG_PARAMS_HASH] and tags[TAG_GIT_COMMIT]
    assert run.data.params["phase2.trainer.max_epochs"] == "2"
    # Per-epoch validation metrics from Lightning's MLflow logger; test metrics; Phase-1 figures.
    history = client.get_metric_history(run.info.run_id, "val/metrics_anomaly/auroc")
    assert len(history) == 2
    assert not client.get_metric_history(run.info.run_id, "metrics_anomaly/auroc")
    assert run.data.metrics["test/metrics_anomaly/auroc"] == pytest.approx(
        s.evaluation.metrics["metrics_anomaly/auroc"]  # type: ignore[attr-defined]
    )
    assert run.data.metrics["phase1/pixels"] > 0
    assert 0 < run.data.metrics["phase1/val/metrics_anomaly/auroc"] <= 1
    # The RX initialization-quality check (params phase1.init_check: warn) is on record.
    assert 0 < run.data.metrics["phase1/init_quality/rx/fit_ratio"] <= 1.0 + 1e-9
    assert "phase1/init_quality/rx/ok" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pipeline", "evaluation", "init_state"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert any(p.endswith(".png") for p in evaluation)
    mv = client.get_model_version_by_alias(reg.model_name, "champion")
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id
    # Why it exists, in one line; the trigger; the outcome line.
    description = mv.description or ""
    assert description.startswith("manual: first run; data ") and "\n" not in description
    assert tags["cubeline.trigger"] == "manual" and tags["cubeline.reason"] == "manual: first run"
    assert tags["cubeline.outcome"].endswith("-> champion (" + reg.reason + ")")

    # The initialization state is restorable by its hash from the in-repo DVC remote alone.
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "outputs" / "states")
    path = restore_init_state(
        s.state_hash,  # type: ignore[attr-defined]
        root=root,
        remote="local",
        states_dir=root / "outputs" / "states",
    )
    assert path.is_file() and path.with_suffix(".json").is_file()


def test_run_leaves_git_tree_unchanged(trained: tuple[Path, object, str]) -> None:
    root, _, before = trained
    assert git(root, "status", "--porcelain") == before


def test_predict_with_champion(trained: tuple[Path, object, str], tmp_path: Path) -> None:
    from tasks.predict import predict_cubes
    from tasks.registry import RegistryError

    root, _, _ = trained
    frame = root / "data" / "session" / "abu-urban-5.mat"
    scored = predict_cubes(root / "params.yaml", [frame], tmp_path / "pred")
    assert (scored.version, scored.model_uri) == ("1", "models:/cubeline-channel-selector/1")
    names = sorted(p.name for p in scored.files)
    assert names == [
        "abu-urban-5_0.decisions.npy",
        "abu-urban-5_0.scores.npy",
        "anomaly_map_abu-urban-5_0.png",
    ]
    scores = np.load(tmp_path / "pred" / "abu-urban-5_0.scores.npy")
    decisions = np.load(tmp_path / "pred" / "abu-urban-5_0.decisions.npy")
    assert scores.shape == (100, 100) and np.isfinite(scores).all()
    assert decisions.dtype == bool and decisions.shape == (100, 100)
    with pytest.raises(RegistryError, match="no alias"):
        predict_cubes(root / "params.yaml", [frame], tmp_path / "x", alias="nope")


def test_second_retrain_with_nothing_changed_registers_nothing(
    trained: tuple[Path, object, str],
) -> None:
    root, first, _ = trained
    s = _retrain(root, reason="second run")
    assert not s.drift.drifted and not s.drift.reinitialize  # type: ignore[attr-defined]
    assert s.phase1 == "reused"  # type: ignore[attr-defined]
    assert s.phase1_reason == "no drift against champion v1: its state reused"  # type: ignore[attr-defined]
    assert s.state_hash == first.state_hash  # type: ignore[attr-defined]
    # Same data, split, params, Phase-1 state and code as version 1: nothing new to register.
    assert s.unchanged_version == "1" and s.registration is None  # type: ignore[attr-defined]
    client = _mlflow(root)
    versions = client.search_model_versions("name = 'cubeline-channel-selector'")
    assert [str(v.version) for v in versions] == ["1"]
    tags = client.get_run(s.ctx.run_id).data.tags  # type: ignore[attr-defined]
    assert "unchanged: version 1" in tags["cubeline.outcome"]


def test_unchanged_data_and_params_skip_phase1_via_cache(
    trained: tuple[Path, object, str],
) -> None:
    root, first, _ = trained
    s = _train(root)  # the retrain's Phase 1 had the same data, params and code
    assert s.phase1 == "cached"  # type: ignore[attr-defined]
    assert s.state_hash == first.state_hash  # type: ignore[attr-defined]
    edit_params(root, phase1={"seed": 7})
    s2 = _train(root)
    assert s2.phase1 == "fitted"  # type: ignore[attr-defined]


def test_changed_pipeline_params_reinitialize(trained: tuple[Path, object, str]) -> None:
    root, first, _ = trained
    edit_params(root, pipeline={"n_select": 8})
    s = _retrain(root, reason="n_select changed")
    assert not s.drift.drifted and s.drift.reinitialize  # type: ignore[attr-defined]
    assert "other params.yaml pipeline" in s.drift.reason  # type: ignore[attr-defined]
    assert s.phase1 == "fitted"  # type: ignore[attr-defined]
    assert s.state_hash != first.state_hash  # type: ignore[attr-defined]


def test_invalid_frames_stop_at_load_cubes(repo_copy: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.retrain import retrain
    from tasks.versioning import ensure_data

    ensure_data(repo_copy)
    # One NaN pixel in the test frame.
    path = repo_copy / "data" / "session" / "abu-urban-5.mat"
    scene = scipy.io.loadmat(path)
    cube = scene["data"].astype(np.float64)
    cube[3, 4, 5] = np.nan
    path.unlink()
    scipy.io.savemat(path, {"data": cube, "map": scene["map"]})

    state = for_repo(retrain, repo_copy)(
        params_path=str(repo_copy / "params.yaml"), reason="bad data", return_state=True
    )
    assert state.is_failed()
    with pytest.raises(DataValidationError) as exc:
        state.result()
    msg = str(exc.value)
    assert "abu-urban-5.mat" in msg and "n_nonfinite" in msg and "pandera report" in msg
    # The flow stopped at load_cubes: no other step ran.
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as prefect_client:
        task_runs = prefect_client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert [
        (r.name.rsplit("-", 1)[0], r.state_type.value if r.state_type is not None else None)
        for r in task_runs
    ] == [("load_cubes", "FAILED")]
    # Nothing registered; the flow's MLflow run is marked FAILED.
    client = _mlflow(repo_copy)
    assert client.search_registered_models() == []
    experiment = client.get_experiment_by_name("cubeline")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_predict_replaces_planted_links_and_refuses_changed_models(
    trained: tuple[Path, object, str], tmp_path: Path
) -> None:
    """Outputs never write through a link; a model changed in the artifact store never loads."""
    from nodes.errors import ContentHashError
    from tasks.predict import predict_cubes

    root, _, _ = trained
    frame = root / "data" / "session" / "abu-urban-5.mat"
    out = tmp_path / "pred"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "abu-urban-5_0.scores.npy").symlink_to(victim)
    (out / "anomaly_map_abu-urban-5_0.png").symlink_to(victim)
    predict_cubes(root / "params.yaml", [frame], out)
    assert victim.read_text() == "keep me"
    assert not (out / "abu-urban-5_0.scores.npy").is_symlink()
    assert np.load(out / "abu-urban-5_0.scores.npy").shape == (100, 100)

    # Change the champion's weights file in the artifact store after registration.
    client = _mlflow(root)
    mv = client.get_model_version_by_alias("cubeline-channel-selector", "champion")
    model_id = mv.model_id or str(mv.source).removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    stored = next(Path(location.removeprefix("file://")).rglob("*.pt"))
    original = stored.read_bytes()
    stored.write_bytes(original + b"appended")
    try:
        with pytest.raises(ContentHashError, match="differs from the file registered"):
            predict_cubes(root / "params.yaml", [frame], tmp_path / "x")
    finally:
        stored.write_bytes(original)
