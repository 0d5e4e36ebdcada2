from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodes.errors import ConfigError
from nodes.training.config import (
    CallbacksConfig,
    EarlyStoppingConfig,
    LearningRateMonitorConfig,
    ModelCheckpointConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    TrainingConfig,
)


def guide_config() -> TrainingConfig:
    """The reference guide's complete configuration, spelt with our classes."""
    return TrainingConfig(
        seed=42,
        optimizer=OptimizerConfig(name="adamw", lr=0.001, weight_decay=1e-4),
        scheduler=SchedulerConfig(
            name="reduce_on_plateau",
            monitor="metrics_anomaly/iou",
            mode="max",
            factor=0.5,
            patience=5,
        ),
        trainer=TrainerConfig(
            max_epochs=50,
            accelerator="auto",
            callbacks=CallbacksConfig(
                checkpoint=ModelCheckpointConfig(
                    monitor="metrics_anomaly/iou",
                    mode="max",
                    save_top_k=3,
                    filename="best-{epoch:02d}",
                    dirpath="outputs/checkpoints",
                ),
                early_stopping=[
                    EarlyStoppingConfig(monitor="val/bce", mode="min", patience=10, min_delta=0.001)
                ],
                lr_monitor=LearningRateMonitorConfig(logging_interval="epoch"),
            ),
        ),
    )


# ---------------------------------------------------------------- construction and defaults


def test_guide_examples_construct_with_expected_values() -> None:
    cfg = guide_config()
    assert cfg.optimizer.name == "adamw"
    assert cfg.scheduler is not None and cfg.scheduler.factor == 0.5
    assert cfg.trainer.callbacks.early_stopping[0].min_delta == 0.001
    assert cfg.trainer.callbacks.checkpoint is not None
    assert cfg.trainer.callbacks.checkpoint.save_top_k == 3
    # The guide's short forms rely on defaults.
    assert OptimizerConfig(lr=0.0001).name == "adamw"
    short = TrainingConfig(trainer=TrainerConfig(max_epochs=20, accelerator="auto"))
    assert short.scheduler is None
    assert short.trainer.accelerator == "auto"
    assert short.trainer.callbacks == CallbacksConfig()


def test_defaults() -> None:
    t = TrainerConfig()
    assert (t.accelerator, t.devices, t.precision) == ("auto", "auto", "32-true")
    assert ModelCheckpointConfig().mode == "min"
    assert EarlyStoppingConfig(monitor="x").patience == 3
    assert LearningRateMonitorConfig().logging_interval == "epoch"


def test_names_are_normalised_case_and_dashes() -> None:
    assert OptimizerConfig(name="AdamW").name == "adamw"  # type: ignore[arg-type]
    sched = SchedulerConfig(name="Reduce-On-Plateau", monitor="m")  # type: ignore[arg-type]
    assert sched.name == "reduce_on_plateau"
    assert TrainerConfig(accelerator="CPU").accelerator == "cpu"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "expected"),
    [(32, "32-true"), ("16", "16-mixed"), ("bf16", "bf16-mixed"), (64, "64-true")],
)
def test_precision_legacy_values_normalised(given: object, expected: str) -> None:
    assert TrainerConfig(precision=given).precision == expected  # type: ignore[arg-type]


def test_bad_precision_and_devices_rejected() -> None:
    with pytest.raises(ConfigError, match="precision"):
        TrainerConfig(precision="8-true")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="devices"):
        TrainerConfig(devices=0)
    with pytest.raises(ConfigError, match="devices"):
        TrainerConfig(devices="gpu-please")
    assert TrainerConfig(devices=[0, 1]).devices == (0, 1)


# ---------------------------------------------------------------- immutability


def test_models_are_frozen_and_hashable() -> None:
    cfg = guide_config()
    with pytest.raises(ConfigError, match=r"frozen.*replace"):
        cfg.trainer.max_epochs = 3
    assert isinstance(cfg.trainer.callbacks.early_stopping, tuple)
    assert hash(cfg) == hash(guide_config())


def test_replace_validates() -> None:
    cfg = guide_config()
    changed = cfg.replace(seed=7, optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
    assert changed.seed == 7 and changed.optimizer.momentum == 0.9
    assert cfg.seed == 42
    with pytest.raises(ConfigError, match="seed"):
        cfg.replace(seed=-1)


# ---------------------------------------------------------------- dict / YAML round trip


def test_dict_round_trip_is_exact() -> None:
    cfg = guide_config()
    data = cfg.to_dict()
    assert TrainingConfig.from_dict(data) == cfg
    assert isinstance(data["trainer"]["callbacks"]["early_stopping"], list)
    # plain data only: YAML safe_dump would refuse tuples or custom objects
    yaml.safe_dump(data)


def test_yaml_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = guide_config().replace(
        optimizer=OptimizerConfig(lr=1e-10, weight_decay=3.0e-7),
        trainer=TrainerConfig(devices=[0, 1], gradient_clip_val=0.5),
    )
    path = cfg.to_yaml(tmp_path / "sub" / "train.yaml")
    assert path.exists()
    assert TrainingConfig.from_yaml(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["train.yaml"]  # no temp file left


def test_yaml_section_and_yaml11_float_strings(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e-3` as a string; the config must still take it as a float.
    text = """
gradient_train:
  training:
    seed: 1
    optimizer: {name: adam, lr: 1e-3}
    trainer:
      max_epochs: 2
      callbacks:
        early_stopping: {monitor: val/bce}
other: {}
"""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    cfg = TrainingConfig.from_yaml(path, section="gradient_train.training")
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    # a lone mapping is taken as a one-element list
    assert cfg.trainer.callbacks.early_stopping == (EarlyStoppingConfig(monitor="val/bce"),)


def test_empty_yaml_section_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("train:\n")
    assert TrainingConfig.from_yaml(path, section="train") == TrainingConfig()


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        TrainingConfig.from_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        TrainingConfig.from_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must be a mapping"):
        TrainingConfig.from_yaml(lst)
    sec = tmp_path / "sec.yaml"
    sec.write_text("train: {seed: 1}\n")
    with pytest.raises(ConfigError, match=r"no section 'training'.*keys there: train"):
        TrainingConfig.from_yaml(sec, section="training")


# ---------------------------------------------------------------- unknown fields


def test_unknown_top_level_field_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_dict({"sed": 1})
    msg = str(info.value)
    assert "unknown field 'sed'" in msg
    assert "Did you mean 'seed'" in msg
    assert "seed, optimizer, scheduler, trainer" in msg


def test_unknown_nested_field_names_path_file_and_valid_fields(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"trainer": {"callbacks": {"checkpoint": {"montor": "val/bce"}}}}})
    )
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_yaml(path, section="train")
    msg = str(info.value)
    assert "trainer.callbacks.checkpoint.montor" in msg
    assert str(path) in msg and "section 'train'" in msg
    assert "Did you mean 'monitor'" in msg
    assert "Valid fields of ModelCheckpointConfig: monitor, mode, save_top_k" in msg


def test_unknown_field_inside_list_entry_and_all_errors_reported() -> None:
    data = {
        "optimizer": {"name": "adamx"},
        "trainer": {
            "callbacks": {"early_stopping": [{"monitor": "a"}, {"monitor": "b", "patiense": 2}]}
        },
    }
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_dict(data)
    msg = str(info.value)
    assert "trainer.callbacks.early_stopping[1].patiense" in msg
    assert "Valid fields of EarlyStoppingConfig" in msg
    assert "optimizer.name" in msg
    assert "2 problem(s)" in msg


def test_unknown_field_direct_construction_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown field 'lerning_rate'"):
        OptimizerConfig(lerning_rate=0.1)  # type: ignore[call-arg]


# ---------------------------------------------------------------- value validation


def test_bad_optimizer_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        OptimizerConfig(name="rmsprop")  # type: ignore[arg-type]
    msg = str(info.value)
    assert "name" in msg and "'rmsprop'" in msg
    for valid in ("adamw", "adam", "sgd"):
        assert f"'{valid}'" in msg


def test_bad_scheduler_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_dict({"scheduler": {"name": "cosine_warm", "monitor": "m"}})
    msg = str(info.value)
    assert "scheduler.name" in msg
    for valid in ("reduce_on_plateau", "cosine", "step"):
        assert f"'{valid}'" in msg


def test_reduce_on_plateau_needs_monitor() -> None:
    with pytest.raises(ConfigError, match=r"reduce_on_plateau needs 'monitor'"):
        SchedulerConfig(name="reduce_on_plateau")
    with pytest.raises(ConfigError, match=r"scheduler: reduce_on_plateau needs 'monitor'"):
        TrainingConfig.from_dict({"scheduler": {"mode": "max"}})
    # other schedulers do not need one
    assert SchedulerConfig(name="cosine").monitor is None
    assert SchedulerConfig(name="step", step_size=3, gamma=0.5).step_size == 3


def test_mode_is_a_literal() -> None:
    with pytest.raises(ConfigError, match=r"mode.*'min' or 'max'"):
        EarlyStoppingConfig(monitor="x", mode="maximum")  # type: ignore[arg-type]


def test_momentum_only_for_sgd() -> None:
    assert OptimizerConfig(name="sgd", lr=0.1, momentum=0.9).momentum == 0.9
    with pytest.raises(ConfigError, match="only used by 'sgd'"):
        OptimizerConfig(name="adam", momentum=0.9)


@pytest.mark.parametrize(
    "bad",
    [
        {"optimizer": {"lr": 0}},
        {"optimizer": {"weight_decay": -1}},
        {"scheduler": {"monitor": "m", "factor": 1.5}},
        {"trainer": {"max_epochs": 0}},
        {"trainer": {"gradient_clip_val": -1.0}},
        {"seed": -3},
    ],
)
def test_out_of_range_values_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="Invalid TrainingConfig"):
        TrainingConfig.from_dict(bad)


def test_top_k_without_monitor_rejected() -> None:
    with pytest.raises(ConfigError, match="needs 'monitor'"):
        ModelCheckpointConfig(save_top_k=3)
    assert ModelCheckpointConfig(save_top_k=-1).monitor is None


def test_same_metric_with_opposite_modes_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'metrics_anomaly/iou'.*mode 'max'.*'min'"):
        TrainingConfig(
            scheduler=SchedulerConfig(monitor="metrics_anomaly/iou", mode="max"),
            trainer=TrainerConfig(
                callbacks=CallbacksConfig(
                    checkpoint=ModelCheckpointConfig(monitor="metrics_anomaly/iou", mode="min")
                )
            ),
        )


def test_param_groups_per_node_learning_rates() -> None:
    cfg = OptimizerConfig.from_dict({"lr": 1e-3, "weight_decay": 1e-4, "param_groups": [
        {"nodes": ["rx"], "lr": 1e-5}, {"nodes": ["logit_head"], "lr": 5e-2, "weight_decay": 0}]})
    assert cfg.node_settings("rx") == (1e-5, 1e-4)
    assert cfg.node_settings("logit_head") == (5e-2, 0.0)
    assert cfg.node_settings("selector") == (1e-3, 1e-4)
    assert OptimizerConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)
    with pytest.raises(ConfigError, match=r"more than one parameter group"):
        OptimizerConfig(param_groups=[{"nodes": ["rx"]}, {"nodes": ["rx", "x"]}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="at least one node"):
        OptimizerConfig(param_groups=[{"nodes": []}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"param_groups\[0\].lr"):
        OptimizerConfig(param_groups=[{"nodes": ["rx"], "lr": 0}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="Did you mean 'nodes'"):
        OptimizerConfig(param_groups=[{"node": ["rx"]}])  # type: ignore[list-item]
