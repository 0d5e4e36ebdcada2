"""tasks/tracking.py against a real MLflow SQLite store in a temporary directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nodes.errors import DataValidationError
from tasks.tracking import (
    MAX_PARAM_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    TAG_DATA_HASH,
    TAG_GIT_COMMIT,
    TAG_INIT_STATE_HASH,
    TAG_PARAMS_HASH,
    TrackingUnavailableError,
    average_precision,
    configure_mlflow,
    flatten_params,
    git_commit,
    log_evaluation,
    params_hash,
    roc_curve,
    set_lineage_tags,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    import mlflow

    root = tmp_path_factory.mktemp("tracking-repo")
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = configure_mlflow(None, root, experiment_name="tracking-tests")
    yield root, uri
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


# --------------------------------------------------------------------------------------------
# configure_mlflow
# --------------------------------------------------------------------------------------------


def test_default_store_and_artifacts_are_absolute_under_the_repo(
    store: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    root, uri = store
    assert uri == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    assert (root / "mlflow.db").is_file()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["DO_NOT_TRACK"] == "true"
    exp = mlflow.get_experiment_by_name("tracking-tests")
    assert exp is not None
    assert exp.artifact_location == (root.resolve() / "mlartifacts").as_uri()
    # A run started from another working directory still writes under the repo.
    monkeypatch.chdir(tmp_path)
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "note.txt")
    assert (root / "mlartifacts" / run.info.run_id / "artifacts" / "note.txt").is_file()
    assert not list(tmp_path.iterdir())


def test_relative_sqlite_uri_is_taken_relative_to_the_repo(store: tuple[Path, str]) -> None:
    import mlflow

    root, uri = store
    again = configure_mlflow("sqlite:///mlflow.db", root, experiment_name="tracking-tests")
    assert again == uri
    assert mlflow.get_tracking_uri() == uri == mlflow.get_registry_uri()


@pytest.mark.slow
def test_tracking_server_keeps_its_own_artifact_store(tmp_path: Path) -> None:
    """Against a real ``mlflow server``, artifacts go to the server's store, not the repo."""
    import urllib.request

    import mlflow

    port = _closed_port()
    served = tmp_path / "served-artifacts"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(served), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "mlflow server exited early"
                assert time.monotonic() < deadline, "mlflow server did not start in 90 s"
                time.sleep(0.5)
        repo = tmp_path / "repo"
        assert configure_mlflow(uri, repo, experiment_name="served") == uri
        exp = mlflow.get_experiment_by_name("served")
        assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
        with mlflow.start_run() as run:
            mlflow.log_text("hello", "note.txt")
        assert not (repo / "mlartifacts").exists()
        assert [p.name for p in served.rglob("note.txt")] == ["note.txt"]
        assert run.info.run_id in str(next(served.rglob("note.txt")))
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        server.terminate()
        server.wait(timeout=30)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket is


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as info:
        configure_mlflow(uri, tmp_path)
    assert time.monotonic() - start < 3.0
    message = str(info.value)
    assert uri in message and "mlflow server" in message
    assert not (tmp_path / "mlflow.db").exists()


def test_silent_server_fails_within_the_timeout(tmp_path: Path) -> None:
    # Accepts TCP connections but never answers HTTP (a hung server, a wrong service).
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        uri = f"http://127.0.0.1:{srv.getsockname()[1]}/"
        start = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match="did not answer"):
            configure_mlflow(uri, tmp_path)
        assert time.monotonic() - start < 4.0


@pytest.mark.slow
def test_two_processes_opening_a_fresh_store_at_once(tmp_path: Path) -> None:
    # Unserialized, MLflow's schema migration races ("duplicate column name") on a fresh DB.
    repo = Path(__file__).resolve().parents[2]
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tasks.tracking import configure_mlflow\n"
        "import mlflow\n"
        "root = Path(sys.argv[1])\n"
        "(root / f'ready-{sys.argv[2]}').touch()\n"
        "while not (root / 'go').exists():\n"
        "    time.sleep(0.01)\n"
        "configure_mlflow(None, root)\n"
        "with mlflow.start_run():\n"
        "    mlflow.log_param('who', sys.argv[2])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(i)],
            cwd=repo,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]


# --------------------------------------------------------------------------------------------
# Params and lineage
# --------------------------------------------------------------------------------------------


def test_flatten_params() -> None:
    params = {
        "data": {"paths": ["a.mat", "b.mat"], "train_ids": [0, 1], "annotation_path": None},
        "phase1": {"normal_only": True, "sharding": {"n_shards": 1, "address": None}},
        "phase2": {"trainer": {"callbacks": {"early_stopping": [{"monitor": "x", "mode": "max"}]}}},
        "empty": {},
        "path": Path("/tmp/x"),
    }
    assert flatten_params(params) == {
        "data.paths": "a.mat,b.mat",
        "data.train_ids": "0,1",
        "data.annotation_path": "null",
        "phase1.normal_only": "true",
        "phase1.sharding.n_shards": "1",
        "phase1.sharding.address": "null",
        "phase2.trainer.callbacks.early_stopping.0.monitor": "x",
        "phase2.trainer.callbacks.early_stopping.0.mode": "max",
        "empty": "{}",
        "path": "/tmp/x",
    }
    assert flatten_params({"a": 1}, prefix="p") == {"p.a": "1"}


def test_flatten_params_truncates_to_mlflows_limits() -> None:
    from mlflow.utils import validation

    assert validation.MAX_PARAM_VAL_LENGTH == MAX_PARAM_VALUE_LENGTH
    assert validation.MAX_ENTITY_KEY_LENGTH == MAX_PARAM_KEY_LENGTH
    flat = flatten_params({"long": "x" * 10_000})
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH and flat["long"].endswith("[truncated]")
    with pytest.raises(ValueError, match="shorten"):
        flatten_params({"k" * 300: 1})


def test_flattened_params_are_accepted_by_mlflow(store: tuple[Path, str]) -> None:
    import mlflow

    params = {"a": {"b": "y" * 7000, "c": list(range(2000))}}
    with mlflow.start_run() as run:
        mlflow.log_params(flatten_params(params))
    logged = mlflow.get_run(run.info.run_id).data.params
    assert set(logged) == {"a.b", "a.c"}


def test_params_hash_ignores_key_order_only() -> None:
    a = {"x": 1, "y": {"p": [1, 2], "q": None}}
    b = {"y": {"q": None, "p": [1, 2]}, "x": 1}
    assert params_hash(a) == params_hash(b)
    assert params_hash(a) != params_hash({**a, "x": 2})
    assert len(params_hash(a)) == 64


def test_git_commit_clean_dirty_and_not_a_repo(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "f.txt").write_text("1")
    for cmd in (["git", "init", "-q"], ["git", "add", "f.txt"], ["git", "commit", "-qm", "c"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_commit(repo) == head
    (repo / "f.txt").write_text("2")
    assert git_commit(repo) == f"{head}+dirty"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_commit(plain) == "unknown"


def test_set_lineage_tags(store: tuple[Path, str]) -> None:
    import mlflow

    with mlflow.start_run() as run:
        tags = set_lineage_tags("md5:data", "md5:init", "abc", "deadbeef+dirty")
    got = mlflow.get_run(run.info.run_id).data.tags
    for key in (TAG_DATA_HASH, TAG_INIT_STATE_HASH, TAG_PARAMS_HASH, TAG_GIT_COMMIT):
        assert got[key] == tags[key]
    assert got["mlflow.source.git.commit"] == "deadbeef+dirty"
    with pytest.raises(TrackingUnavailableError, match="No MLflow run is active"):
        set_lineage_tags("a", "b", "c", "d")


# --------------------------------------------------------------------------------------------
# Curves and evaluation artifacts
# --------------------------------------------------------------------------------------------


def test_roc_and_ap_agree_with_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    targets = rng.random(5000) < 0.05
    # Rounded scores: many ties, the case where curve code usually goes wrong.
    scores = np.round(rng.normal(size=5000) + 1.5 * targets, 1)
    _, _, auc = roc_curve(scores, targets)
    assert auc == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
    assert average_precision(scores, targets) == pytest.approx(
        average_precision_score(targets, scores), abs=1e-12
    )
    assert np.isnan(roc_curve(scores, np.zeros(5000, bool))[2])
    assert np.isnan(average_precision(scores, np.zeros(5000, bool)))


def _eval_data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    targets = np.zeros((2, 20, 24), bool)
    targets[0, 5:8, 5:9] = True
    targets[1, 12:15, 2:4] = True
    scores = rng.normal(size=targets.shape) + 3.0 * targets
    return scores.astype(np.float32), targets, ["abu-urban-5", "frame/2"]


def test_log_evaluation_writes_and_logs_pngs(store: tuple[Path, str], tmp_path: Path) -> None:
    import mlflow

    scores, targets, ids = _eval_data()
    with mlflow.start_run() as run:
        paths = log_evaluation(scores, targets, ids, tmp_path / "eval")
    assert set(paths) == {
        "roc_curve",
        "pr_curve",
        "score_histogram",
        "anomaly_map:abu-urban-5",
        "anomaly_map:frame/2",
    }
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/roc_curve.png",
        "evaluation/pr_curve.png",
        "evaluation/score_histogram.png",
        "evaluation/anomaly_maps",
    } <= top
    maps = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/anomaly_maps")}
    assert maps == {
        "evaluation/anomaly_maps/anomaly_map_abu-urban-5.png",
        "evaluation/anomaly_maps/anomaly_map_frame_2.png",
    }


def test_log_evaluation_rejects_bad_input_without_writing(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    import mlflow

    scores, targets, ids = _eval_data()
    out = tmp_path / "eval"
    bad_scores = scores.copy()
    bad_scores[0, 0, 0] = np.nan
    with mlflow.start_run():
        with pytest.raises(DataValidationError, match="targets shape"):
            log_evaluation(scores, targets[:, :10], ids, out)
        with pytest.raises(DataValidationError, match="frame ids"):
            log_evaluation(scores, targets, ids[:1], out)
        with pytest.raises(DataValidationError, match="non-finite"):
            log_evaluation(bad_scores, targets, ids, out)
        with pytest.raises(DataValidationError, match=r"\(N, H, W\)"):
            log_evaluation(scores[0], targets[0], ids, out)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Lightning logger
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lightning_logger_writes_epochs_into_the_flow_run(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    import lightning as L
    import mlflow
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tasks.tracking import make_lightning_logger

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"hidden": 4, "params": {"lr": 0.1}})
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train/loss", loss, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    _, uri = store
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    with mlflow.start_run() as run:
        mlflow.log_param("hidden", "from-params-yaml")  # must not clash with Lightning's
        logger = make_lightning_logger(run.info.run_id, uri)
        trainer = L.Trainer(
            max_epochs=3,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(Tiny(), DataLoader(data, batch_size=8))
        # The flow still owns the run after fit.
        assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"
        mlflow.log_metric("test/auroc", 0.9)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 3
    params = client.get_run(run.info.run_id).data.params
    assert params["hidden"] == "from-params-yaml"
    assert params["lightning.hidden"] == "4" and params["lightning.params.lr"] == "0.1"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in history]  # Lightning's global steps survive the buffering
    assert steps == sorted(set(steps)) and steps[0] > 0


def test_lightning_logger_buffers_metrics_until_the_interval_or_finalize(
    store: tuple[Path, str],
) -> None:
    import mlflow

    from tasks.tracking import make_lightning_logger

    _, uri = store
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        rid = run.info.run_id
        buffered = make_lightning_logger(rid, uri, flush_interval_s=3600.0)
        buffered.log_metrics({"val/iou": 0.5, "bad key!": 1.0}, step=0)
        buffered.log_metrics({"val/iou": 0.6}, step=1)
        assert client.get_metric_history(rid, "val/iou") == []  # still buffered
        buffered.finalize("failed")  # Lightning's call when fit raises: nothing is lost
        assert [(m.step, m.value) for m in client.get_metric_history(rid, "val/iou")] == [
            (0, 0.5),
            (1, 0.6),
        ]
        # Sanitized as the stock logger does, and filed under val/ like every metric-node value.
        assert [m.value for m in client.get_metric_history(rid, "val/bad key")] == [1.0]
        live = make_lightning_logger(rid, uri, flush_interval_s=0.0)
        live.log_metrics({"train/loss": 2.0}, step=0)
        assert [m.value for m in client.get_metric_history(rid, "train/loss")] == [2.0]
