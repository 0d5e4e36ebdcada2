from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodes.errors import ConfigError, TrainingError
from nodes.training.config import (
    CallbacksConfig,
    EarlyStoppingConfig,
    LearningRateMonitorConfig,
    ModelCheckpointConfig,
    OptimizerConfig,
    ParamGroupConfig,
    SchedulerConfig,
    TrainerConfig,
    TrainingConfig,
)
from nodes.training.optim import (
    build_callbacks,
    build_optimizer,
    build_scheduler,
    build_trainer_kwargs,
    check_monitored_keys,
    monitored_keys,
)


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return list(torch.nn.Linear(3, 2).parameters())


# ---------------------------------------------------------------- optimizer


@pytest.mark.parametrize(
    ("cfg", "cls"),
    [
        (OptimizerConfig(name="adamw", lr=0.01, weight_decay=1e-4), torch.optim.AdamW),
        (OptimizerConfig(name="adam", lr=0.02, weight_decay=0.0), torch.optim.Adam),
        (OptimizerConfig(name="sgd", lr=0.3, weight_decay=1e-3, momentum=0.9), torch.optim.SGD),
    ],
)
def test_build_optimizer_maps_fields(cfg: OptimizerConfig, cls: type) -> None:
    opt = build_optimizer(params(), cfg)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == cfg.lr
    assert group["weight_decay"] == cfg.weight_decay
    if cfg.name == "sgd":
        assert group["momentum"] == 0.9


def test_adamw_weight_decay_comes_from_config_not_torch_default() -> None:
    opt = build_optimizer(params(), OptimizerConfig(name="adamw"))
    assert opt.param_groups[0]["weight_decay"] == 0.0  # torch's AdamW default is 0.01


def test_frozen_parameters_are_dropped() -> None:
    ps = params()
    ps[1].requires_grad_(False)
    opt = build_optimizer(ps, OptimizerConfig())
    assert len(opt.param_groups[0]["params"]) == 1
    for p in ps:
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="unfreeze_nodes_by_name"):
        build_optimizer(ps, OptimizerConfig())


def test_param_groups_pass_through() -> None:
    ps = params()
    groups: list[dict[str, Any]] = [{"params": [ps[0]], "lr": 0.5}, {"params": [ps[1]]}]
    opt = build_optimizer(groups, OptimizerConfig(lr=0.1))
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]


def test_unvalidated_unknown_optimizer_name_still_fails_clearly() -> None:
    cfg = OptimizerConfig.model_construct(name="lion", lr=0.1, weight_decay=0.0, momentum=0.0)
    with pytest.raises(ConfigError, match="valid names: adamw, adam, sgd"):
        build_optimizer(params(), cfg)


# ---------------------------------------------------------------- scheduler


def test_reduce_on_plateau_dict_form() -> None:
    opt = build_optimizer(params(), OptimizerConfig())
    cfg = SchedulerConfig(monitor="metrics_anomaly/iou", mode="max", factor=0.5, patience=5)
    out = build_scheduler(opt, cfg)
    sched = out["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (sched.mode, sched.factor, sched.patience) == ("max", 0.5, 5)
    assert out["monitor"] == "metrics_anomaly/iou"
    assert out["interval"] == "epoch" and out["frequency"] == 1 and out["strict"] is True


def test_cosine_period_from_config_or_max_epochs() -> None:
    opt = build_optimizer(params(), OptimizerConfig())
    out = build_scheduler(opt, SchedulerConfig(name="cosine", t_max=7, eta_min=1e-5))
    sched = out["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert (sched.T_max, sched.eta_min) == (7, 1e-5)
    assert "monitor" not in out
    sched2 = build_scheduler(opt, SchedulerConfig(name="cosine"), max_epochs=30)["scheduler"]
    assert isinstance(sched2, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched2.T_max == 30
    with pytest.raises(ConfigError, match="t_max"):
        build_scheduler(opt, SchedulerConfig(name="cosine"))


def test_step_scheduler_and_interval() -> None:
    opt = build_optimizer(params(), OptimizerConfig())
    out = build_scheduler(
        opt, SchedulerConfig(name="step", step_size=4, gamma=0.5, interval="step", frequency=2)
    )
    sched = out["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    assert (sched.step_size, sched.gamma) == (4, 0.5)
    assert (out["interval"], out["frequency"]) == ("step", 2)


# ---------------------------------------------------------------- callbacks


def test_build_callbacks_maps_every_field(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    cfg = CallbacksConfig(
        checkpoint=ModelCheckpointConfig(
            monitor="metrics_anomaly/iou",
            mode="max",
            save_top_k=3,
            filename="best-{epoch:02d}",
            dirpath=str(tmp_path / "ck"),
            save_last=True,
        ),
        early_stopping=[
            EarlyStoppingConfig(monitor="val/bce", mode="min", patience=10, min_delta=0.001),
            EarlyStoppingConfig(monitor="metrics_anomaly/iou", mode="max", patience=2),
        ],
        lr_monitor=LearningRateMonitorConfig(logging_interval="step", log_momentum=True),
    )
    cbs = build_callbacks(cfg, default_dirpath=tmp_path / "unused")
    assert [type(c) for c in cbs] == [
        ModelCheckpoint,
        EarlyStopping,
        EarlyStopping,
        LearningRateMonitor,
    ]
    # from the `lightning` namespace, never `pytorch_lightning`
    assert all(type(c).__module__.startswith("lightning.pytorch.") for c in cbs)
    ck, es1, es2, lr = cbs
    assert isinstance(ck, ModelCheckpoint)
    assert ck.dirpath is not None and Path(ck.dirpath) == tmp_path / "ck"
    assert (ck.monitor, ck.mode, ck.save_top_k, ck.filename, ck.save_last) == (
        "metrics_anomaly/iou",
        "max",
        3,
        "best-{epoch:02d}",
        True,
    )
    assert isinstance(es1, EarlyStopping) and isinstance(es2, EarlyStopping)
    assert (es1.monitor, es1.mode, es1.patience) == ("val/bce", "min", 10)
    # Lightning stores min_delta signed by mode (negative when minimising)
    assert abs(es1.min_delta) == pytest.approx(0.001)
    assert (es2.monitor, es2.mode, es2.patience) == ("metrics_anomaly/iou", "max", 2)
    assert isinstance(lr, LearningRateMonitor)
    assert lr.logging_interval == "step" and lr.log_momentum is True


def test_checkpoint_default_dirpath(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    cbs = build_callbacks(
        CallbacksConfig(checkpoint=ModelCheckpointConfig()), default_dirpath=tmp_path
    )
    assert isinstance(cbs[0], ModelCheckpoint)
    assert cbs[0].dirpath is not None and Path(cbs[0].dirpath) == tmp_path


def test_no_callbacks() -> None:
    assert build_callbacks(None) == []
    assert build_callbacks(CallbacksConfig()) == []


def test_trainer_kwargs_build_a_lightning_trainer(tmp_path: Path) -> None:
    import lightning

    cfg = TrainerConfig(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        gradient_clip_val=1.0,
        callbacks=CallbacksConfig(checkpoint=ModelCheckpointConfig()),
    )
    kwargs = build_trainer_kwargs(cfg)
    assert kwargs["enable_checkpointing"] is True
    assert Path(kwargs["callbacks"][0].dirpath) == tmp_path / "checkpoints"
    trainer = lightning.Trainer(**kwargs, logger=False)
    assert trainer.max_epochs == 3
    assert trainer.gradient_clip_val == 1.0
    # without a checkpoint config, Lightning must not add its own (it writes into the CWD)
    plain = build_trainer_kwargs(TrainerConfig(accelerator="cpu", devices=1))
    assert plain["enable_checkpointing"] is False and plain["callbacks"] == []
    assert lightning.Trainer(**plain, logger=False).checkpoint_callbacks == []


def test_builders_drive_a_tiny_lightning_fit(tmp_path: Path) -> None:
    """The scheduler dict, monitors and callbacks are accepted by a real Lightning run."""
    import lightning

    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
    data = torch.utils.data.TensorDataset(x, y)

    cfg = TrainingConfig(
        optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.5),
        scheduler=SchedulerConfig(monitor="val/loss", mode="min", patience=0, factor=0.5),
        trainer=TrainerConfig(
            max_epochs=3,
            accelerator="cpu",
            devices=1,
            default_root_dir=str(tmp_path),
            callbacks=CallbacksConfig(
                checkpoint=ModelCheckpointConfig(monitor="val/loss", save_top_k=1),
                early_stopping=[EarlyStoppingConfig(monitor="val/loss", patience=5)],
                lr_monitor=LearningRateMonitorConfig(),
            ),
        ),
    )

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            xb, yb = batch
            loss = torch.nn.functional.mse_loss(self.lin(xb).squeeze(-1), yb)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            xb, yb = batch
            self.log("val/loss", torch.nn.functional.mse_loss(self.lin(xb).squeeze(-1), yb))

        def configure_optimizers(self) -> Any:
            opt = build_optimizer(self.parameters(), cfg.optimizer)
            assert cfg.scheduler is not None
            sched = build_scheduler(opt, cfg.scheduler, max_epochs=cfg.trainer.max_epochs)
            return {"optimizer": opt, "lr_scheduler": sched}

    loader = torch.utils.data.DataLoader(data, batch_size=8)
    from lightning.pytorch.loggers import CSVLogger

    trainer = lightning.Trainer(
        **build_trainer_kwargs(cfg.trainer), logger=CSVLogger(str(tmp_path / "logs"))
    )
    trainer.fit(Tiny(), loader, loader)
    assert trainer.current_epoch == 3
    check_monitored_keys(cfg, trainer.callback_metrics)
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert "lr-SGD" in trainer.callback_metrics


# ---------------------------------------------------------------- monitored keys


def test_monitored_keys_collects_scheduler_checkpoint_and_early_stops() -> None:
    cfg = TrainingConfig(
        scheduler=SchedulerConfig(monitor="metrics_anomaly/iou", mode="max"),
        trainer=TrainerConfig(
            callbacks=CallbacksConfig(
                checkpoint=ModelCheckpointConfig(monitor="val/f1", mode="max"),
                early_stopping=[
                    EarlyStoppingConfig(monitor="val/bce"),
                    EarlyStoppingConfig(monitor="metrics_anomaly/iou", mode="max"),
                ],
            )
        ),
    )
    assert monitored_keys(cfg) == {"metrics_anomaly/iou", "val/f1", "val/bce"}
    assert monitored_keys(TrainingConfig()) == set()
    # a cosine schedule ignores `monitor`, so it is not a requirement
    cos = TrainingConfig(scheduler=SchedulerConfig(name="cosine", monitor="unused"))
    assert monitored_keys(cos) == set()


def test_check_monitored_keys_names_missing_key_and_its_source() -> None:
    cfg = TrainingConfig(
        trainer=TrainerConfig(
            callbacks=CallbacksConfig(early_stopping=[EarlyStoppingConfig(monitor="val/bec")])
        )
    )
    check_monitored_keys(cfg, ["val/bec"])
    with pytest.raises(TrainingError) as info:
        check_monitored_keys(cfg, ["val/bce", "train/loss"])
    msg = str(info.value)
    assert "'val/bec'" in msg and "trainer.callbacks.early_stopping[0]" in msg
    assert "train/loss, val/bce" in msg


def test_build_param_groups_by_node_name() -> None:
    from nodes.training.optim import build_param_groups

    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    c.bias.requires_grad_(False)
    cfg = OptimizerConfig(lr=1e-3, weight_decay=1e-4, param_groups=[
        ParamGroupConfig(nodes=["rx"], lr=1e-5),
        ParamGroupConfig(nodes=["head"], lr=5e-2, weight_decay=0.0)])
    groups = build_param_groups([("sel", a), ("rx", b), ("head", c)], cfg)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"default", "rx", "head"}
    assert by_name["rx"]["lr"] == 1e-5 and by_name["rx"]["weight_decay"] == 1e-4
    assert by_name["head"]["params"] == [c.weight]  # the frozen bias is left out
    assert by_name["default"]["lr"] == 1e-3 and len(by_name["default"]["params"]) == 2
    opt = build_optimizer(groups, cfg)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-5, 1e-3, 5e-2]
    with pytest.raises(ConfigError, match=r"unknown node\(s\) \['rx'\].*head, sel"):
        build_param_groups([("sel", a), ("head", c)], cfg)


def test_param_groups_reach_the_lightning_optimizer(tmp_path: Path) -> None:
    from nodes.graph.pipeline import Pipeline
    from nodes.library.rx import RXGlobal
    from nodes.training.gradient_trainer import PipelineModule

    p = Pipeline("p")
    rx = RXGlobal(num_channels=2, name="rx")
    p.add_node(rx)
    module = PipelineModule(p, [], [], OptimizerConfig(lr=1e-3, param_groups=[
        ParamGroupConfig(nodes=["rx"], lr=1e-5)]), None)
    rx.mu = torch.zeros(2, dtype=torch.float64)
    rx.sigma = torch.eye(2, dtype=torch.float64)
    rx.unfreeze()
    opt = module.configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [1e-5]
    assert {id(q) for q in opt.param_groups[0]["params"]} == {id(rx.mu), id(rx.cov_factor)}


def test_relative_lr_scales_each_parameter_by_its_magnitude() -> None:
    from nodes.training.optim import build_param_groups

    head = torch.nn.Module()
    head.scale = torch.nn.Parameter(torch.tensor(0.004))
    head.bias = torch.nn.Parameter(torch.tensor(0.0))
    rx = torch.nn.Module()
    rx.cov = torch.nn.Parameter(torch.full((2, 2), 3e-3))
    cfg = OptimizerConfig(lr=1e-3, param_groups=[
        ParamGroupConfig(nodes=["head", "rx"], lr=0.1, relative_lr=True)])
    groups = build_param_groups([("head", head), ("rx", rx)], cfg)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"head+rx/0": 0.1 * 0.004, "head+rx/1": 0.1,
                                 "head+rx/2": 0.1 * 3e-3})
    # One Adam step then moves each parameter by about lr * |p|: 10 % of it, not 25x it.
    opt = build_optimizer(groups, cfg)
    (head.scale * 5.0 + head.bias + rx.cov.sum()).backward()
    before = float(head.scale)
    opt.step()
    assert abs(float(head.scale) - before) == pytest.approx(0.1 * 0.004, rel=1e-3)
