"""The step functions without an orchestrator (``task.fn``), their cache keys and helpers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from nodes.errors import DataValidationError
from tasks.predict import predict_cubes
from tasks.steps import (
    DataRef,
    RunContext,
    drift_check,
    fit_statistics,
    load_cubes,
    tracked_run,
    unfreeze,
)
from tasks.steps.cache import step_key
from tests.flows.helpers import FAST_PARAMS, copy_repo, edit_params


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("steps") / "repo")
    edit_params(root, **FAST_PARAMS)
    return root


def _ctx(root: Path, **kw: Any) -> RunContext:
    return RunContext(str(root / "params.yaml"), str(root), **kw)


@pytest.fixture(scope="module")
def data(repo: Path) -> DataRef:
    return load_cubes.fn(_ctx(repo))


def test_load_cubes_returns_a_small_reference(repo: Path, data: DataRef) -> None:
    from tasks.versioning import read_dvc_file

    assert data.data_hash == read_dvc_file(repo)[0] and not data.dirty
    assert data.shape == (100, 100, 205) and data.num_frames == 5
    assert (data.train_ids, data.val_ids, data.test_ids) == ((0, 1, 2), (3,), (4,))
    assert data.frame_names[0] == "abu-airport-1.mat#0"
    assert data.anomaly_pixels == 144 + 87 + 170 + 272 + 232
    assert all(Path(p).is_absolute() for p in data.paths)


def test_data_version_is_read_with_its_own_split(
    repo: Path, data: DataRef, tmp_path: Path
) -> None:
    from tasks.data_versions import Split
    from tasks.steps import ingest_files

    extra = repo / "data" / "extra" / "abu-urban-1.mat"
    with pytest.raises(DataValidationError, match="204"):
        ingest_files(repo / "params.yaml", [extra, *data.paths[3:]])  # 204 bands, params: 205
    info = ingest_files(
        repo / "params.yaml", list(data.paths), split=Split((0, 1, 2), (3,), (4,))
    )
    ref = load_cubes.fn(_ctx(repo), info.version)
    assert ref.version == ref.data_hash == info.version and not ref.dirty
    assert (ref.train_ids, ref.val_ids, ref.test_ids) == ((0, 1, 2), (3,), (4,))
    assert ref.split_names["test"] == ["abu-urban-5.mat#0"]
    # Inside the version's own folder, not the workspace's data/.
    assert all(str(info.path) in p for p in ref.paths)
    # Same frames, same split: same version; another split: another version.
    again = ingest_files(repo / "params.yaml", list(data.paths), split=info.split)
    assert again.version == info.version
    other = ingest_files(repo / "params.yaml", list(data.paths))
    assert other.split == Split((0, 1, 2), (3,), (4,)) and other.version == info.version
    moved = ingest_files(
        repo / "params.yaml", list(data.paths), split=Split((0, 1, 3), (2,), (4,))
    )
    assert moved.version != info.version


def _key_of(task: Any, ctx: RunContext, **params: Any) -> str:
    key_fn = step_key(("data", "pipeline", "phase1"))
    return key_fn(SimpleNamespace(task=task), {"ctx": ctx, **params})  # type: ignore[arg-type]


def test_cache_key_moves_with_data_params_code_and_repo(
    repo: Path, data: DataRef, tmp_path: Path
) -> None:
    ctx = _ctx(repo)
    base = _key_of(fit_statistics, ctx, data=data)
    assert base == _key_of(fit_statistics, ctx, data=data)
    other_data = DataRef(**{**data.__dict__, "data_hash": "0" * 32 + ".dir"})
    assert _key_of(fit_statistics, ctx, data=other_data) != base
    bumped = SimpleNamespace(name=fit_statistics.name, version="999", fn=fit_statistics.fn)
    assert _key_of(bumped, ctx, data=data) != base
    other_code = SimpleNamespace(name=fit_statistics.name, version=fit_statistics.version, fn=len)
    assert _key_of(other_code, ctx, data=data) != base
    # Another repository with the same params: another key (its DVC cache differs).
    elsewhere = copy_repo(tmp_path / "other")
    edit_params(elsewhere, **FAST_PARAMS)
    assert _key_of(fit_statistics, _ctx(elsewhere), data=data) != base
    # A section the step does not read leaves the key alone; one it reads moves it.
    edit_params(repo, drift={"mean_shift": 9.0})
    assert _key_of(fit_statistics, ctx, data=data) == base
    edit_params(repo, phase1={"seed": 3})
    try:
        assert _key_of(fit_statistics, ctx, data=data) != base
    finally:
        edit_params(repo, phase1={"seed": 0}, drift={"mean_shift": 1.5})


def test_fit_then_unfreeze_from_the_versioned_state(
    repo: Path, data: DataRef, tmp_path: Path
) -> None:
    from nodes.graph.pipeline import Pipeline

    init = fit_statistics.fn(_ctx(repo), data)
    assert init.state_hash.endswith(".dir") and init.source_data_hash == data.data_hash
    assert init.pixel_count == 30000 - (144 + 87 + 170)  # normal-only training pixels
    assert 0.0 < init.val_metrics["metrics_anomaly/auroc"] <= 1.0
    # Content-addressed: fitting the same data with the same params again gives the same hash.
    again = fit_statistics.fn(_ctx(repo), data, use_cache=False)
    assert again.state_hash == init.state_hash and not again.cached
    # The step cache: same data, params and code -> the earlier fit, reported as cached.
    assert fit_statistics.fn(_ctx(repo), data).cached
    ref = unfreeze.fn(_ctx(repo, run_dir=str(tmp_path)), data, init.state_hash, reused=False)
    assert set(ref.unfrozen) == {"selector", "rx", "logit_head"}
    assert ref.trainable_parameters > 0
    loaded = Pipeline.load_from_file(ref.config_path)
    assert set(loaded.unfrozen_node_names()) == set(ref.unfrozen)


def test_drift_check_without_champion_asks_for_phase1(repo: Path, data: DataRef) -> None:
    from tasks.tracking import configure_mlflow

    configure_mlflow(None, repo)
    result = drift_check.fn(_ctx(repo), data)
    assert result.reinitialize and not result.drifted
    assert "no champion" in result.reason and result.reference_state_hash is None


def test_tracked_run_marks_failures(repo: Path) -> None:
    import mlflow

    with pytest.raises(RuntimeError, match="boom"), tracked_run(repo, "test") as ctx:
        run_id = ctx.run_id
        assert Path(ctx.params_path) == repo / "params.yaml"
        raise RuntimeError("boom")
    assert run_id is not None
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["registry.model_name"] == "cubeline-channel-selector"
    assert run.data.tags["cubeline.flow"] == "test"


def test_predict_refuses_bad_frames_before_writing(repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    cube = np.ones((4, 4, 205), np.float32)
    cube[0, 0, 0] = np.inf
    np.savez(bad, cube=cube, mask=np.zeros((4, 4), np.int64))
    out = tmp_path / "pred"
    with pytest.raises(DataValidationError, match="n_nonfinite"):
        predict_cubes(repo / "params.yaml", [bad], out)
    assert not out.exists()


def test_unreachable_tracking_server_fails_fast(repo: Path) -> None:
    import time

    from tasks.tracking import TrackingUnavailableError

    edit_params(repo, mlflow={"tracking_uri": "http://127.0.0.1:9"})
    try:
        start = time.perf_counter()
        with (
            pytest.raises(TrackingUnavailableError, match=r"127\.0\.0\.1:9"),
            tracked_run(repo, "test"),
        ):
            pytest.fail("the body must not run")
        assert time.perf_counter() - start < 10
    finally:
        edit_params(repo, mlflow={"tracking_uri": None})


def test_step_cache_is_json_checked_not_code(repo: Path, data: DataRef) -> None:
    """A tampered cache entry is a miss (refit), never executed; a valid one is reused."""
    import pickle

    from tasks.steps.cache import cache_file

    ctx = _ctx(repo)
    first = fit_statistics.fn(ctx, data)
    entries = list(cache_file(ctx, "x").parent.glob("*.json"))
    assert entries and all(json.loads(p.read_text())["state_hash"] for p in entries)
    marker = repo / "pwned"
    payload = pickle.dumps(eval)  # stands for any pickle: never unpickled
    for p in entries:
        p.write_bytes(payload + f"open({str(marker)!r}, 'w')".encode())
    refit = fit_statistics.fn(ctx, data)
    assert not refit.cached and refit.state_hash == first.state_hash and not marker.exists()
    assert fit_statistics.fn(ctx, data).cached  # rewritten as valid JSON by the refit


def test_replaced_dvc_cache_object_is_refused(repo: Path, data: DataRef, tmp_path: Path) -> None:
    """Content under a hash that is not that hash's content never passes for it."""
    import shutil

    from nodes.errors import ConfigError
    from tasks.versioning import STATE_FILE, restore_init_state

    ctx = _ctx(repo)
    init = fit_statistics.fn(ctx, data)
    states = repo / "outputs" / "states"
    checked = restore_init_state(init.state_hash, root=repo, remote="local", states_dir=states)
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    target_md5 = hashlib.md5(checked.read_bytes()).hexdigest()
    obj = cache / target_md5[:2] / target_md5[2:]
    assert obj.is_file()
    obj.chmod(0o644)
    altered = bytearray(obj.read_bytes())
    altered[len(altered) // 2] ^= 0xFF  # other content under the same name
    obj.write_bytes(bytes(altered))
    shutil.rmtree(states)
    with pytest.raises(ConfigError, match="holds other content under its hash"):
        restore_init_state(init.state_hash, root=repo, remote="local", states_dir=states)
    assert not (states / init.state_hash.removesuffix(".dir") / STATE_FILE).exists()
    obj.unlink(missing_ok=True)  # the fix the error names (DVC may have dropped it already)
    again = restore_init_state(init.state_hash, root=repo, remote="local", states_dir=states)
    assert again.is_file() and hashlib.md5(again.read_bytes()).hexdigest() == (
        target_md5
    )


def test_runs_left_running_by_dead_processes_are_marked_killed(repo: Path) -> None:
    import socket
    import subprocess
    import sys

    import mlflow

    from tasks.steps import reconcile_dead_runs
    from tasks.tracking import configure_mlflow

    configure_mlflow(None, repo, experiment_name="cubeline")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("cubeline")
    assert exp is not None
    orphan = client.create_run(
        exp.experiment_id, tags={"cubeline.host": socket.gethostname(), "cubeline.pid": str(pid)}
    )
    alive = client.create_run(
        exp.experiment_id, tags={"cubeline.host": socket.gethostname(), "cubeline.pid": "1"}
    )
    assert reconcile_dead_runs() == [orphan.info.run_id]
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert "killed: process" in client.get_run(orphan.info.run_id).data.tags["cubeline.outcome"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    client.set_terminated(alive.info.run_id)


def test_selector_mode_auto_keeps_the_reading_with_the_higher_val_ap(
    repo: Path, data: DataRef, tmp_path: Path
) -> None:
    from nodes.graph.pipeline import Pipeline
    from nodes.training.init_state import read_init_info
    from tasks.steps.data import restore_state

    edit_params(repo, pipeline={"selector_mode": "auto"})
    try:
        ctx = _ctx(repo)
        init = fit_statistics.fn(ctx, data, use_cache=False)
        extra = read_init_info(restore_state(ctx, init.state_hash)).extra
        aps = extra["selector_mode_val_ap"]
        assert set(aps) == {"soft", "hard"} and all(0 < v <= 1 for v in aps.values())
        assert extra["selector_mode"] == max(aps, key=aps.get)
        assert init.val_metrics["metrics_anomaly/ap"] == aps[extra["selector_mode"]]
        ref = unfreeze.fn(_ctx(repo, run_dir=str(tmp_path)), data, init.state_hash, reused=False)
        selector = Pipeline.load_from_file(ref.config_path).nodes["selector"]
        assert getattr(selector, "mode", None) == extra["selector_mode"]
    finally:
        edit_params(repo, pipeline={"selector_mode": "soft"})
