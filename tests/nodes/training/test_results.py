"""Results, metric keys and the guide's config forms (nodes/training/results.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes import (
    CallbacksConfig,
    ConfigError,
    EarlyStoppingConfig,
    ModelCheckpointConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    TrainingConfig,
    TrainingError,
)
from nodes.training.results import (
    MetricValue,
    Results,
    canonical_monitors,
    check_checkpoint_filename,
    default_logger,
    resolve_training_config,
)

BARE = {"metrics_anomaly/iou", "metrics_anomaly/ap"}


def test_results_answer_the_guides_forms() -> None:
    r = Results({"val/bce": 0.5, "val/metrics_anomaly/iou": 0.25})
    assert r["metrics"] == [MetricValue("val/bce", 0.5),
                            MetricValue("val/metrics_anomaly/iou", 0.25)]
    assert "metrics" not in r and list(r) == ["val/bce", "val/metrics_anomaly/iou"]
    with pytest.warns(FutureWarning, match="'val/metrics_anomaly/iou'"):
        assert r["metrics_anomaly/iou"] == 0.25
    with pytest.raises(KeyError, match="keys: "):
        r["metrics_anomaly/f1"]
    phase1 = Results({"metrics_anomaly/iou": 0.1})
    assert phase1["val/metrics_anomaly/iou"] == 0.1  # the prefixed name finds the bare key


def test_bare_monitors_and_filename_fields_become_val_keys() -> None:
    trainer = TrainerConfig(callbacks=CallbacksConfig(
        checkpoint=ModelCheckpointConfig(monitor="metrics_anomaly/iou", mode="max",
                                         filename="best-{epoch:02d}-{metrics_anomaly/iou:.3f}"),
        early_stopping=[EarlyStoppingConfig(monitor="val/bce"),
                        EarlyStoppingConfig(monitor="metrics_anomaly/ap", mode="max")]))
    sched = SchedulerConfig(monitor="metrics_anomaly/iou", mode="max")
    with pytest.warns(FutureWarning, match="'metrics_anomaly/ap' -> 'val/metrics_anomaly/ap'"):
        t2, s2 = canonical_monitors(trainer, sched, BARE)
    ck = t2.callbacks.checkpoint
    assert ck is not None and ck.monitor == "val/metrics_anomaly/iou"
    assert ck.filename == "best-{epoch:02d}-{val/metrics_anomaly/iou:.3f}"
    assert [e.monitor for e in t2.callbacks.early_stopping] == ["val/bce",
                                                                 "val/metrics_anomaly/ap"]
    assert s2 is not None and s2.monitor == "val/metrics_anomaly/iou"
    same_t, same_s = canonical_monitors(t2, s2, BARE)  # nothing bare left: unchanged, no warning
    assert same_t is t2 and same_s is s2


def test_checkpoint_filename_must_name_logged_keys() -> None:
    ok = TrainerConfig(callbacks=CallbacksConfig(checkpoint=ModelCheckpointConfig(
        filename="{epoch}-{step}-{val/bce:.2f}")))
    check_checkpoint_filename(ok, {"val/bce"})
    bad = TrainerConfig(callbacks=CallbacksConfig(checkpoint=ModelCheckpointConfig(
        filename="best-{epoch:02d}-{val_iou:.3f}")))
    with pytest.raises(TrainingError, match=r"names \['val_iou'\].*write 0.*val/bce"):
        check_checkpoint_filename(bad, {"val/bce"})


def test_training_config_fills_the_parts_and_its_seed() -> None:
    tc = TrainingConfig(seed=7, optimizer=OptimizerConfig(lr=0.01),
                        trainer=TrainerConfig(max_epochs=3))
    assert resolve_training_config(tc, None, None, None, None) == (
        tc.trainer, tc.optimizer, None, 7)
    assert resolve_training_config(None, tc, None, None, 1)[3] == 1  # in trainer_config's place
    assert resolve_training_config(tc, None, tc.optimizer, None, None)[1] == tc.optimizer
    with pytest.raises(ConfigError, match="optimizer_config differs"):
        resolve_training_config(tc, None, OptimizerConfig(lr=0.5), None, None)


def test_default_logger_goes_under_the_run_folder(tmp_path: Path) -> None:
    logger = default_logger(TrainerConfig(default_root_dir=str(tmp_path)))
    assert Path(logger.save_dir) == tmp_path and logger.name == "lightning_logs"
    assert Path(default_logger(TrainerConfig()).save_dir) == Path("outputs")
