"""Phase 2 (GradientTrainer) on small seeded cubes: training, logging, determinism, bad input,
resume after SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch

from nodes import (
    AnomalyBCEWithLogits,
    AnomalyDataNode,
    AnomalyDetectionMetrics,
    CallbacksConfig,
    ConfigError,
    CubeDataModule,
    GradientTrainer,
    ModelCheckpointConfig,
    Node,
    NotInitializedError,
    OptimizerConfig,
    Pipeline,
    PipelineError,
    RXGlobal,
    SchedulerConfig,
    ScoreToLogit,
    StatisticalTrainer,
    TrainerConfig,
    TrainingError,
)
from nodes.library.presets import build_channel_selector_pipeline

C = 12


def make_cubes(n: int = 6, size: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated-band cubes with planted anomalous squares (a different spectrum)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(4, C))
    cubes, masks = [], []
    for _ in range(n):
        latent = rng.normal(size=(size, size, 4))
        cube = latent @ mix + 0.1 * rng.normal(size=(size, size, C)) + 5.0
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(2):
            r, c = rng.integers(0, size - 3, size=2)
            mask[r : r + 3, c : c + 3] = True
        cube[mask] += rng.normal(size=C) * 2.0 + 1.5
        cubes.append(cube.astype(np.float32))
        masks.append(mask)
    return np.stack(cubes), np.stack(masks)


def make_dm(seed: int = 0) -> CubeDataModule:
    cubes, masks = make_cubes(seed=seed)
    return CubeDataModule.from_arrays(cubes, masks, train_ids=[0, 1, 2, 3], val_ids=[4],
                                      test_ids=[5], batch_size=2, seed=seed)


def fitted_pipeline(dm: CubeDataModule) -> Pipeline:
    p = build_channel_selector_pipeline(input_channels=C, n_select=4, eps=1e-6)
    StatisticalTrainer(pipeline=p, datamodule=dm).fit()
    return p


# ``Pipeline.nodes`` is an ``nn.ModuleDict`` (items typed ``Module``): these only name the types.
def losses(p: Pipeline) -> list[Node]:
    return [cast(Node, p.nodes["bce"])]


def metric_nodes(p: Pipeline) -> list[AnomalyDetectionMetrics]:
    return [cast(AnomalyDetectionMetrics, p.nodes["metrics_anomaly"])]


def rx_of(p: Pipeline) -> RXGlobal:
    return cast(RXGlobal, p.nodes["rx"])


def trainer_cfg(tmp_path: Path, epochs: int = 3, **kw: object) -> TrainerConfig:
    return TrainerConfig(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False,
                         default_root_dir=str(tmp_path), **kw)  # type: ignore[arg-type]


def train(tmp_path: Path, seed: int = 7) -> tuple[dict[str, float], Pipeline]:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p),
                         trainer_cfg(tmp_path), OptimizerConfig(name="adamw", lr=1e-2),
                         SchedulerConfig(name="reduce_on_plateau",
                                         monitor="val/metrics_anomaly/iou", mode="max"), seed=seed)
    gt.fit()
    return gt.test(), p


def test_fit_logs_losses_and_metrics(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    before = rx_of(p).mu.detach().clone()
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p),
                         trainer_cfg(tmp_path), OptimizerConfig(lr=1e-2), seed=0)
    metrics = gt.fit()
    assert {"train/bce", "val/bce", "val/metrics_anomaly/iou", "val/metrics_anomaly/ap"} <= set(
        metrics)
    assert not torch.equal(before, rx_of(p).mu.detach()), "RX mean did not move"
    test = gt.test()
    assert {"test/metrics_anomaly/iou", "test/metrics_anomaly/f1",
            "test/metrics_anomaly/auroc"} <= set(test)
    # The guide's bare name still answers, with a deprecation warning.
    with pytest.warns(FutureWarning, match="test/metrics_anomaly/iou"):
        assert test["metrics_anomaly/iou"] == test["test/metrics_anomaly/iou"]
    assert gt.calibration is not None and gt.calibration.method == "max_f1"
    threshold = cast(torch.Tensor, p.nodes["decider"].threshold)
    assert float(threshold) == pytest.approx(gt.calibration.probability)


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    a, pa = train(tmp_path / "a")
    b, pb = train(tmp_path / "b")
    assert a == b
    assert torch.equal(rx_of(pa).cov_factor, rx_of(pb).cov_factor)


def test_rx_stays_positive_definite_after_aggressive_training(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["rx"])
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p),
                         trainer_cfg(tmp_path, epochs=4), OptimizerConfig(name="sgd", lr=5.0),
                         seed=0, threshold_method="none")
    # A diverging loss may stop the run; the factor must still give an SPD matrix.
    with contextlib.suppress(TrainingError):
        gt.fit()
    sigma = rx_of(p).sigma.detach()
    assert torch.allclose(sigma, sigma.T)
    # Positive definite, not merely semidefinite: Cholesky succeeds and every eigenvalue is > 0.
    assert int(torch.linalg.cholesky_ex(sigma).info) == 0
    assert torch.linalg.eigvalsh(sigma).min() > 0


def test_unfreeze_keeps_state_dict_keys_and_loads_across_states(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    frozen_keys = set(p.state_dict())
    p.unfreeze_nodes_by_name(["selector", "rx"])
    assert set(p.state_dict()) == frozen_keys
    assert p.nodes["rx"].mu.requires_grad
    p.save_to_file(tmp_path / "unfrozen.yaml")
    loaded = Pipeline.load_from_file(tmp_path / "unfrozen.yaml")
    assert loaded.unfrozen_node_names() == ["selector", "rx"]
    loaded.freeze_nodes_by_name(["selector", "rx"])
    assert not any(q.requires_grad for q in loaded.parameters())
    loaded.load_weights(tmp_path / "unfrozen.pt")  # unfrozen weights into a frozen pipeline
    with pytest.raises(PipelineError, match="unknown nodes"):
        p.unfreeze_nodes_by_name(["nope"])


def test_no_loss_node(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["rx"])
    with pytest.raises(TrainingError, match="at least one loss node"):
        GradientTrainer(p, dm, [], metric_nodes(p), trainer_cfg(tmp_path))


def test_loss_targets_not_connected(tmp_path: Path) -> None:
    p = Pipeline("x")
    data = AnomalyDataNode()
    rx = RXGlobal(num_channels=C)
    head = ScoreToLogit()
    bce = AnomalyBCEWithLogits(name="bce")
    metrics = AnomalyDetectionMetrics()
    p.connect((data.cube, rx.data), (rx.scores, head.scores), (head.logits, bce.predictions),
              (data.mask, metrics.targets))
    with pytest.raises(TrainingError, match=r"unconnected inputs \['targets'\]"):
        GradientTrainer(p, make_dm(), [bce], [metrics], trainer_cfg(tmp_path))


def test_unfreeze_uninitialized_node() -> None:
    p = build_channel_selector_pipeline(input_channels=C, n_select=4)
    with pytest.raises(NotInitializedError, match=r"StatisticalTrainer.fit\(\)"):
        p.unfreeze_nodes_by_name(["rx"])
    assert p.unfrozen_node_names() == []


def test_unknown_optimizer_and_scheduler_names() -> None:
    with pytest.raises(ConfigError, match="adamw"):
        OptimizerConfig(name="lion")  # type: ignore[arg-type]  # deliberately invalid
    with pytest.raises(ConfigError, match="reduce_on_plateau"):
        SchedulerConfig(name="warmup", monitor="val/bce")  # type: ignore[arg-type]  # invalid


def test_scheduler_monitor_never_logged(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["rx"])
    with pytest.raises(TrainingError, match="metrics_anomaly/iuo"):
        GradientTrainer(p, dm, losses(p), metric_nodes(p),
                        trainer_cfg(tmp_path), OptimizerConfig(),
                        SchedulerConfig(name="reduce_on_plateau", monitor="metrics_anomaly/iuo"))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_nan_loss_stops_naming_step_and_keeps_checkpoint(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["logit_head"])
    ckdir = tmp_path / "ck"
    cfg = trainer_cfg(tmp_path, epochs=5, callbacks=CallbacksConfig(
        checkpoint=ModelCheckpointConfig(dirpath=str(ckdir), save_last=True)))

    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p), cfg,
                         OptimizerConfig(lr=1e-3), seed=0)
    import lightning as L

    class Poison(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if trainer.current_epoch == 2:
                with torch.no_grad():
                    cast(torch.Tensor, p.nodes["logit_head"].scale).fill_(float("nan"))

    gt.extra_callbacks.append(Poison())
    with pytest.raises(TrainingError, match=r"global step \d+ \(epoch 2"):
        gt.fit()
    assert (ckdir / "last.ckpt").is_file()
    state = torch.load(ckdir / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.isfinite(state["pipeline.nodes.logit_head.scale"])


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, json
    sys.path.insert(0, {tests!r})
    import lightning as L
    from test_gradient_trainer import make_dm, fitted_pipeline, C
    from nodes import (GradientTrainer, TrainerConfig, OptimizerConfig, SchedulerConfig,
                       CallbacksConfig, ModelCheckpointConfig)
    out, resume, kill_at = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    cfg = TrainerConfig(max_epochs=5, accelerator="cpu", enable_progress_bar=False,
        default_root_dir=out, callbacks=CallbacksConfig(
            checkpoint=ModelCheckpointConfig(dirpath=out + "/ck", save_last=True)))
    class Kill(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    gt = GradientTrainer(p, dm, [p.nodes["bce"]], [p.nodes["metrics_anomaly"]], cfg,
        OptimizerConfig(lr=1e-2), SchedulerConfig(name="step", step_size=2, gamma=0.5),
        seed=3, callbacks=[Kill()])
    gt.fit(ckpt_path="last" if resume else None)
    print("RESULT" + json.dumps(gt.test(), sort_keys=True))
    """
)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def run(out: Path, resume: bool, kill_at: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), str(out), "1" if resume else "0",
                               str(kill_at)], capture_output=True, text=True, env=env,
                              timeout=600)

    full = run(tmp_path / "full", False, -1)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run(tmp_path / "killed", False, 3)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "ck" / "last.ckpt").is_file()
    resumed = run(tmp_path / "killed", True, -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = [ln for ln in full.stdout.splitlines() if ln.startswith("RESULT")]
    again = [ln for ln in resumed.stdout.splitlines() if ln.startswith("RESULT")]
    assert result and result == again


class _Sabotage:
    """Callback factory: wreck the RX mean after every optimizer step of chosen epochs."""

    @staticmethod
    def make(p: Pipeline, epochs: set[int] | None) -> object:
        import lightning as L

        class Sabotage(L.Callback):
            def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
                if epochs is None or trainer.current_epoch in epochs:
                    with torch.no_grad():
                        rx_of(p).mu.add_(50.0)

        return Sabotage()


class _Snapshots:
    """Callback factory: the pipeline state and the monitored value after each validation."""

    @staticmethod
    def make(p: Pipeline, key: str) -> tuple[object, list[tuple[float, dict[str, torch.Tensor]]]]:
        import lightning as L

        seen: list[tuple[float, dict[str, torch.Tensor]]] = []

        class Snap(L.Callback):
            def on_validation_end(self, trainer: L.Trainer, *args: object) -> None:
                state = {k: v.detach().clone() for k, v in p.state_dict().items()}
                seen.append((float(trainer.callback_metrics[key]), state))

        return Snap(), seen


def test_every_epoch_worse_gives_phase1_state_back(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    phase1 = {k: v.detach().clone() for k, v in p.state_dict().items()}
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p), trainer_cfg(tmp_path, epochs=2),
                         OptimizerConfig(lr=1e-2), seed=0, monitor="val/metrics_anomaly/ap",
                         callbacks=[_Sabotage.make(p, None)])  # type: ignore[list-item]
    out = gt.fit()
    report = gt.report
    assert report is not None and report.kept_phase1 and report.outcome == "phase1_kept"
    assert report.best_epoch is None and report.epochs_run == 2
    assert report.monitor == "val/metrics_anomaly/ap" and report.mode == "max"
    assert report.best_score is not None and report.best_score < report.phase1_score
    for k, v in p.state_dict().items():
        if k.endswith(("threshold",)):
            continue  # the calibration after fit sets the decider's threshold
        assert torch.equal(v, phase1[k]), k
    assert out["val/metrics_anomaly/ap"] == report.phase1_score
    assert "kept the Phase-1 state" in report.summary()
    assert report.to_dict()["outcome"] == "phase1_kept"
    # What is handed back scores on validation exactly as the Phase-1 initialization did.
    assert gt.validate()["val/metrics_anomaly/ap"] == pytest.approx(report.phase1_score, abs=1e-6)


def test_best_validation_epoch_is_kept_not_the_last(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    snap, seen = _Snapshots.make(p, "val/bce")
    # The last epoch is wrecked, so the best epoch is an earlier one.
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p), trainer_cfg(tmp_path, epochs=4),
                         OptimizerConfig(lr=1e-2), seed=0,
                         callbacks=[_Sabotage.make(p, {3}), snap])  # type: ignore[list-item]
    gt.fit()
    report = gt.report
    assert report is not None and report.monitor == "val/bce" and report.mode == "min"
    scores = [s for s, _ in seen]
    best = min(range(len(scores)), key=scores.__getitem__)
    assert best < 3 and scores[3] > scores[best]
    assert not report.kept_phase1 and report.best_epoch == best
    assert report.best_score is not None and report.best_score == pytest.approx(scores[best])
    assert report.best_score < report.phase1_score
    for k, v in seen[best][1].items():
        if not k.endswith("threshold"):
            assert torch.equal(p.state_dict()[k], v), k


def test_monitor_defaults_follow_the_config(tmp_path: Path) -> None:
    dm = make_dm()
    p = fitted_pipeline(dm)
    p.unfreeze_nodes_by_name(["logit_head"])
    cfg = trainer_cfg(tmp_path, callbacks=CallbacksConfig(
        checkpoint=ModelCheckpointConfig(monitor="val/metrics_anomaly/auroc", mode="max")))
    sched = SchedulerConfig(name="reduce_on_plateau", monitor="val/bce", mode="min")
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p), cfg, OptimizerConfig(), sched)
    assert (gt.monitor, gt.monitor_mode) == ("val/metrics_anomaly/auroc", "max")
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p), trainer_cfg(tmp_path),
                         OptimizerConfig(), sched)
    assert (gt.monitor, gt.monitor_mode) == ("val/bce", "min")
    gt = GradientTrainer(p, dm, losses(p), metric_nodes(p), trainer_cfg(tmp_path))
    assert (gt.monitor, gt.monitor_mode) == ("val/bce", "min")
    with pytest.raises(TrainingError, match="val/metrics_anomaly/apx"):
        GradientTrainer(p, dm, losses(p), metric_nodes(p), trainer_cfg(tmp_path),
                        monitor="val/metrics_anomaly/apx")
