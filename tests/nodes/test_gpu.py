"""CUDA paths: Phase 1 on the GPU equals the CPU fit; Phase 2 trains on the GPU.

Skipped cleanly where CUDA is absent (CI); run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch

from nodes import (
    AnomalyDetectionMetrics,
    GradientTrainer,
    Node,
    OptimizerConfig,
    RXGlobal,
    StatisticalTrainer,
    TrainerConfig,
)
from nodes.data import CubeDataModule
from nodes.library.presets import build_channel_selector_pipeline
from nodes.training.stats import MomentAccumulator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _dm() -> CubeDataModule:
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(4, 16))
    cubes = (rng.normal(size=(6, 32, 32, 4)) @ mix + 5).astype(np.float32)
    masks = np.zeros((6, 32, 32), dtype=bool)
    masks[:, 10:13, 10:13] = True
    cubes[masks] += 3.0
    return CubeDataModule.from_arrays(cubes, masks, train_ids=[0, 1, 2, 3], val_ids=[4],
                                      test_ids=[5], batch_size=2)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_accumulator_on_cuda_equals_cpu(fused: bool) -> None:
    x = torch.randn(300_000, 61, dtype=torch.float32) * 3 + 10
    cpu, gpu = MomentAccumulator(61), MomentAccumulator(61, chunk=65_536, fused=fused)
    for part in (x[:100_000], x[100_000:100_001], x[100_001:]):  # several batches: merges too
        cpu.update(part)
        gpu.update(part.cuda())
    a, b = cpu.finalize(), gpu.finalize().to("cpu")
    assert torch.allclose(a.m2, b.m2, rtol=1e-10, atol=0)
    assert _max_rel(b.m2, a.m2) <= 1e-12 and _max_rel(b.mean, a.mean) <= 1e-12
    assert torch.allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max)


def test_phase1_on_cuda_equals_cpu_and_phase2_trains(tmp_path: Path) -> None:
    dm = _dm()
    cpu = build_channel_selector_pipeline(input_channels=16, n_select=4)
    StatisticalTrainer(pipeline=cpu, datamodule=dm).fit()
    gpu = build_channel_selector_pipeline(input_channels=16, n_select=4).to("cuda")
    StatisticalTrainer(pipeline=gpu, datamodule=dm).fit()
    cpu_rx, gpu_rx = cast(RXGlobal, cpu.nodes["rx"]), cast(RXGlobal, gpu.nodes["rx"])
    assert gpu_rx.mu.is_cuda
    assert torch.allclose(cpu_rx.sigma, gpu_rx.sigma.cpu(), rtol=1e-6)
    gpu.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    losses = [cast(Node, gpu.nodes["bce"])]
    metrics = [cast(AnomalyDetectionMetrics, gpu.nodes["metrics_anomaly"])]
    gt = GradientTrainer(gpu, dm, losses, metrics,
                         TrainerConfig(max_epochs=2, accelerator="gpu", devices=1,
                                       enable_progress_bar=False,
                                       default_root_dir=str(tmp_path)),
                         OptimizerConfig(lr=1e-2), seed=0)
    gt.fit()
    res = gt.test()
    assert 0.0 <= res["metrics_anomaly/auroc"] <= 1.0
