"""The guide's "Saving & Loading", "Best Practices" and "Troubleshooting" sections on cubeline.

Snippets are reproduced with only the imports, data paths and band count changed; where the
guide uses a name it never defines (``build_pipeline``, ``test_data``, ``calib_data``,
``remove_outliers``, ``initialization_data``) the test defines it and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from nodes import (
    EarlyStoppingConfig,
    GradientTrainer,
    NotInitializedError,
    OptimizerConfig,
    Pipeline,
    PipelineMetadata,
    SingleCu3sDataModule,
    StatisticalTrainer,
    TrainerConfig,
)
from nodes.training.init_state import read_init_info, save_init_state
from tests.guide.helpers import BANDS, build_guide_pipeline

Check = Callable[..., None]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def node(pipeline: Pipeline, name: str) -> Any:
    """``pipeline.nodes[name]``, typed for mypy."""
    return pipeline.nodes[name]


def _datamodule(session_npz: Path, batch_size: int = 4) -> SingleCu3sDataModule:
    return SingleCu3sDataModule(cu3s_file_path=session_npz, annotation_json_path=None,
                                train_ids=[0, 1, 2], val_ids=[3], test_ids=[4],
                                batch_size=batch_size)


@pytest.fixture
def fitted(session_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> tuple[Pipeline, SingleCu3sDataModule, StatisticalTrainer]:
    """The guide's pipeline after Phase 1, in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    pipeline = build_guide_pipeline()
    datamodule = _datamodule(session_npz)
    stat_trainer = StatisticalTrainer(pipeline=pipeline, datamodule=datamodule)
    stat_trainer.fit()
    return pipeline, datamodule, stat_trainer


def _test_batch(datamodule: SingleCu3sDataModule) -> dict[str, torch.Tensor]:
    datamodule.setup("test")
    return next(iter(datamodule.test_dataloader()))


def test_save_full_pipeline_and_load_it(fitted: Any, guide_lines: Check) -> None:
    guide_lines('"outputs/trained_pipeline.yaml",',
                'metadata=PipelineMetadata(name="Full_Pipeline")',
                "# Generates: outputs/trained_pipeline.yaml, outputs/trained_pipeline.pt",
                "outputs = pipeline.forward(batch=test_data)")
    pipeline, datamodule, _ = fitted
    pipeline.save_to_file(
        "outputs/trained_pipeline.yaml",
        metadata=PipelineMetadata(name="Full_Pipeline")
    )
    assert Path("outputs/trained_pipeline.yaml").is_file()
    assert Path("outputs/trained_pipeline.pt").is_file()
    original = pipeline
    pipeline = Pipeline.load_from_file(
        config_path="outputs/trained_pipeline.yaml",
        weights_path="outputs/trained_pipeline.pt",
        device="cpu"  # the guide loads onto "cuda"; see the GPU test below
    )
    test_data = _test_batch(datamodule)  # the guide's undefined `test_data`: a test batch
    outputs = pipeline.forward(batch=test_data)
    torch.testing.assert_close(outputs["rx_detector.scores"],
                               original.forward(batch=test_data)["rx_detector.scores"])


@needs_cuda
@pytest.mark.gpu
def test_load_complete_pipeline_onto_cuda(fitted: Any) -> None:
    pipeline, datamodule, _ = fitted
    pipeline.save_to_file("outputs/trained_pipeline.yaml",
                          metadata=PipelineMetadata(name="Full_Pipeline"))
    pipeline = Pipeline.load_from_file(
        config_path="outputs/trained_pipeline.yaml",
        weights_path="outputs/trained_pipeline.pt",
        device="cuda"
    )
    test_data = {k: v.cuda() for k, v in _test_batch(datamodule).items()}
    outputs = pipeline.forward(batch=test_data)
    assert outputs["rx_detector.scores"].is_cuda


def test_save_initialization_state_and_load_it_separately(fitted: Any,
                                                          guide_lines: Check) -> None:
    guide_lines('"rx_mean": pipeline.nodes["rx_detector"].mu.clone(),',
                '"normalizer_min": pipeline.nodes["normalizer"].running_min.clone(),',
                'init_state = torch.load("outputs/initialization.pt")',
                "pipeline = build_pipeline()",
                'pipeline.nodes["rx_detector"].sigma = init_state["rx_cov"]',
                'pipeline.nodes["rx_detector"]._statistically_initialized = True')
    fitted_pipeline, datamodule, _ = fitted
    pipeline = fitted_pipeline
    Path("outputs").mkdir(exist_ok=True)
    # Option 2: Save Initialization State
    initialization_state = {
        "rx_mean": node(pipeline, "rx_detector").mu.clone(),
        "rx_cov": node(pipeline, "rx_detector").sigma.clone(),
        "normalizer_min": node(pipeline, "normalizer").running_min.clone(),
        "normalizer_max": node(pipeline, "normalizer").running_max.clone(),
    }
    torch.save(initialization_state, "outputs/initialization.pt")

    # Load with Separate Initialization. The guide never defines build_pipeline(): it is the
    # graph the state came from, unfitted.
    build_pipeline = build_guide_pipeline
    init_state = torch.load("outputs/initialization.pt")
    pipeline = build_pipeline()
    node(pipeline, "rx_detector").mu = init_state["rx_mean"]
    node(pipeline, "rx_detector").sigma = init_state["rx_cov"]
    node(pipeline, "rx_detector")._statistically_initialized = True

    rx, rx0 = node(pipeline, "rx_detector"), node(fitted_pipeline, "rx_detector")
    assert rx.is_initialized
    x = torch.rand(1, 5, 5, 10)
    torch.testing.assert_close(rx(data=x)["scores"], rx0(data=x)["scores"])
    # The guide restores RX and the normalizer's statistics but not the selector, so the full
    # pipeline cannot run yet, and says which node is missing and how to restore it.
    norm = node(pipeline, "normalizer")
    norm.running_min = init_state["normalizer_min"]
    norm.running_max = init_state["normalizer_max"]
    assert norm.is_initialized  # both statistics assigned: marked, no private flag needed
    with pytest.raises(NotInitializedError, match=r"'selector'.*load_init_state"):
        pipeline.forward(batch=_test_batch(datamodule))


def test_manual_restore_order_does_not_matter(fitted: Any) -> None:
    pipeline0, _, _ = fitted
    rx0 = node(pipeline0, "rx_detector")
    for order in (("sigma", "mu"), ("mu", "sigma")):
        rx = node(build_guide_pipeline(), "rx_detector")
        for name in order:
            setattr(rx, name, getattr(rx0, name).clone())
        assert rx.is_initialized, order
    pca_pipeline = build_guide_pipeline()
    # Setting a node's statistics by hand, then marking it through the public method:
    sel = node(pca_pipeline, "selector")
    with pytest.raises(NotInitializedError, match="channel_logits holds NaN"):
        sel.mark_initialized()
    sel.channel_logits = node(pipeline0, "selector").channel_logits.clone()
    assert sel.is_initialized


def test_best_practice_separate_initialization_data(session_npz: Path) -> None:
    # "Use normal samples for initialization": normal_only leaves the labelled anomalies out.
    pipeline = build_guide_pipeline()
    report = StatisticalTrainer(pipeline=pipeline, datamodule=_datamodule(session_npz),
                                normal_only=True).fit()
    assert report.pixels == 3 * 100 * 100 - (144 + 87 + 170)  # airport-1..3 anomaly pixels


def test_best_practice_validate_initialization_quality(fitted: Any, guide_lines: Check,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    guide_lines("def validate_initialization(rx_node, validation_data):",
                'outputs = rx_node.forward(data=batch["data"])', "if mean_score > 1.0:")
    pipeline, datamodule, stat_trainer = fitted

    def validate_initialization(rx_node: Any, validation_data: Any) -> None:
        with torch.no_grad():
            scores = []
            for batch in validation_data:
                outputs = rx_node.forward(data=batch["data"])
                scores.append(outputs["scores"])
            all_scores = torch.cat(scores)
            mean_score = all_scores.mean().item()
            if mean_score > 1.0:
                print("⚠️ Warning: High mean score indicates poor initialization")

    # Fed the very pixels RX was fitted on, the guide's check warns: a squared Mahalanobis
    # distance averages about C there (10 channels here, less the ridge's share), never <= 1.
    datamodule.setup("fit")
    fit_data = [{"data": pipeline.forward(b, outputs=["selector.selected"])["selector.selected"]}
                for b in datamodule.train_dataloader()]
    validate_initialization(node(pipeline, "rx_detector"), fit_data)
    assert "poor initialization" in capsys.readouterr().out
    # The correct check: fit ratio (mean d^2 / C on the fit pixels) and held-out ratio.
    (quality,) = stat_trainer.check_initialization("val").values()
    assert quality.ok and 0.5 < quality.fit_ratio < 1.0
    assert quality.held_out_ratio is not None and quality.held_out_ratio < 3.0


def test_best_practice_detect_data_drift(fitted: Any, guide_lines: Check) -> None:
    guide_lines("def needs_reinitialization(node, new_data_stats, threshold=0.1):",
                "drift_ratio = mean_drift / torch.abs(node.mu).mean()")
    pipeline, _, _ = fitted

    def needs_reinitialization(node: Any, new_data_stats: Any, threshold: float = 0.1) -> Any:
        if not node._statistically_initialized:
            return True
        mean_drift = torch.abs(node.mu - new_data_stats["mean"]).mean()
        drift_ratio = mean_drift / torch.abs(node.mu).mean()
        return drift_ratio > threshold

    rx = node(pipeline, "rx_detector")
    assert not needs_reinitialization(rx, {"mean": rx.mu.clone()})
    assert needs_reinitialization(rx, {"mean": rx.mu * 1.5})
    assert needs_reinitialization(node(build_guide_pipeline(), "rx_detector"), {})


def test_best_practice_version_initialization(fitted: Any, guide_lines: Check) -> None:
    guide_lines('"version": "1.0",', '"n_samples": len(initialization_data),')
    pipeline, _, stat_trainer = fitted
    # The guide's dict (its undefined initialization_data: the Phase-1 pixel count here) ...
    initialization_meta = {
        "version": "1.0",
        "date": "2026-01-29",
        "source": "data/initialization_v1/",
        "n_samples": stat_trainer.report.pixels,
    }
    Path("outputs").mkdir(exist_ok=True)
    torch.save(initialization_meta, "outputs/initialization_v1_meta.pt")
    assert torch.load("outputs/initialization_v1_meta.pt")["n_samples"] == 30_000
    # ... and what cubeline records for it: the state plus a JSON sidecar.
    info = save_init_state(pipeline, "outputs/init.pt", source_data_hash="abc",
                           fit_report=stat_trainer.report)
    assert read_init_info("outputs/init.pt").pixel_count == info.pixel_count == 30_000


def test_troubleshooting_node_not_initialized(session_npz: Path, guide_lines: Check,
                                              tmp_path: Path) -> None:
    guide_lines("stat_trainer.fit() # Phase 1", "grad_trainer.fit() # Phase 2")
    pipeline = build_guide_pipeline()
    datamodule = _datamodule(session_npz)
    losses, metrics = [node(pipeline, "bce")], [node(pipeline, "metrics_anomaly")]
    cfg = TrainerConfig(max_epochs=2, accelerator="cpu", enable_progress_bar=False,
                        default_root_dir=str(tmp_path))
    with pytest.raises(NotInitializedError, match=r"run StatisticalTrainer\.fit"):
        GradientTrainer(pipeline, datamodule, losses, metrics, cfg)
    stat_trainer = StatisticalTrainer(pipeline=pipeline, datamodule=datamodule)
    stat_trainer.fit()  # Phase 1
    pipeline.unfreeze_nodes_by_name(["selector"])
    grad_trainer = GradientTrainer(pipeline, datamodule, losses, metrics, cfg)
    grad_trainer.fit()  # Phase 2
    assert grad_trainer.trainer is not None and grad_trainer.trainer.current_epoch == 2


def test_troubleshooting_poor_detection_performance(session_npz: Path, session_mats: Any,
                                                    guide_lines: Check) -> None:
    guide_lines("percentiles = torch.quantile(calib_data, torch.tensor([0.01, 0.99]))",
                "clean_data = remove_outliers(calib_data)")
    from nodes.data.readers import read_frames

    # The guide's calib_data: the training pixels (N, C) of the first scene.
    calib_data = torch.from_numpy(read_frames(session_mats[0])[0].cube.reshape(-1, BANDS))
    print(f"Calibration samples: {len(calib_data)}")
    print(f"Data range: [{calib_data.min():.2f}, {calib_data.max():.2f}]")
    percentiles = torch.quantile(calib_data, torch.tensor([0.01, 0.99]))
    assert float(percentiles[0]) < float(percentiles[1])
    # remove_outliers() is not defined by the guide; Phase 1's trim_quantile is ours (RX refit
    # without the highest-scoring training pixels).
    trainer = StatisticalTrainer(pipeline=build_guide_pipeline(),
                                 datamodule=_datamodule(session_npz), trim_quantile=0.99)
    report = trainer.fit()
    assert report.trimmed["rx_detector"]["dropped"] == pytest.approx(300, rel=0.05)


def test_troubleshooting_gradient_training_degrades(fitted: Any, guide_lines: Check) -> None:
    guide_lines("optimizer_config = OptimizerConfig(lr=0.0001)", 'unfreeze_nodes = ["selector"]',
                'monitor="val/metrics_anomaly/iou",')
    pipeline, datamodule, _ = fitted
    # 1. Reduce learning rate
    optimizer_config = OptimizerConfig(lr=0.0001)
    # 2. Freeze some nodes
    unfreeze_nodes = ["selector"]
    # 3. Use early stopping
    early_stopping = EarlyStoppingConfig(
        monitor="val/metrics_anomaly/iou",
        mode="max",
        patience=5
    )
    pipeline.unfreeze_nodes_by_name(unfreeze_nodes)
    cfg = TrainerConfig.from_dict({"callbacks": {"early_stopping": [early_stopping.to_dict()]}})
    trainer = GradientTrainer(pipeline, datamodule, [node(pipeline, "bce")],
                              [node(pipeline, "metrics_anomaly")], cfg, optimizer_config)
    assert "val/metrics_anomaly/iou" in trainer.logged_keys()
    assert pipeline.unfrozen_node_names() == ["selector"]


def test_troubleshooting_calibration_takes_too_long(session_npz: Path, session_mats: Any,
                                                    guide_lines: Check) -> None:
    guide_lines("indices = torch.randperm(len(calib_data))[:10000]",
                "datamodule = SingleCu3sDataModule(..., batch_size=32)")
    from nodes.data.readers import read_frames

    calib_data = torch.from_numpy(read_frames(session_mats[0])[0].cube.reshape(-1, BANDS))
    # Option 1: Sample data
    if len(calib_data) > 10000:
        indices = torch.randperm(len(calib_data))[:10000]
        calib_data = calib_data[indices]
    assert calib_data.shape == (10000, BANDS)
    # ... which StatisticalTrainer does per frame, seeded: sample_fraction.
    full = StatisticalTrainer(build_guide_pipeline(), _datamodule(session_npz)).fit().pixels
    part = StatisticalTrainer(build_guide_pipeline(), _datamodule(session_npz),
                              sample_fraction=0.25).fit().pixels
    assert part == pytest.approx(full / 4, rel=0.05)
    # Option 2: Larger batch size
    datamodule = _datamodule(session_npz, batch_size=32)
    assert StatisticalTrainer(build_guide_pipeline(), datamodule).fit().pixels == full


@needs_cuda
@pytest.mark.gpu
def test_troubleshooting_use_gpu(session_npz: Path) -> None:
    pipeline = build_guide_pipeline()
    # Option 3: Use GPU
    pipeline = pipeline.to("cuda")
    report = StatisticalTrainer(pipeline, _datamodule(session_npz)).fit()
    assert report.pixels == 30_000 and node(pipeline, "rx_detector").mu.is_cuda
