"""Shared by the sharding tests of nodes/ and tasks/: frame files, the pipeline, the comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nodes import (
    AnomalyDataNode,
    AnomalyDetectionMetrics,
    BinaryDecider,
    MinMaxNormalizer,
    Pipeline,
    RXGlobal,
    ScoreToLogit,
    SoftChannelSelector,
)
from nodes.training.stats import MomentState


def write_npz(directory: Path, cubes: Sequence[np.ndarray],
              masks: Sequence[np.ndarray]) -> list[Path]:
    """Frames as Cubert SDK-free exports (cube, wavelengths, mask, class_mask)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (cube, mask) in enumerate(zip(cubes, masks, strict=True)):
        path = directory / f"frame_{i:03d}.npz"
        np.savez(path, cube=cube, wavelengths=np.arange(400, 400 + 10 * cube.shape[-1], 10),
                 mask=mask.astype(np.int32), class_mask=mask.astype(np.uint8))
        paths.append(path)
    return paths


def chain(channels: int = 12, head: bool = True) -> Pipeline:
    """data → normalizer → selector → RX [→ logit head → decider → metrics]: two passes."""
    pipe = Pipeline("chain")
    data = AnomalyDataNode()
    norm = MinMaxNormalizer(name="norm")
    sel = SoftChannelSelector(n_select=5, input_channels=channels, name="sel")
    rx = RXGlobal(num_channels=5, eps=0.0, name="rx")
    pipe.connect((data.cube, norm.data), (norm.normalized, sel.data), (sel.selected, rx.data))
    if head:
        logit, decider = ScoreToLogit(name="head"), BinaryDecider(name="decider")
        metrics = AnomalyDetectionMetrics(name="metrics_anomaly")
        pipe.connect((rx.scores, logit.scores), (logit.logits, decider.logits),
                     (decider.decisions, metrics.decisions), (data.mask, metrics.targets))
    return pipe


def max_rel_diff(a: MomentState, b: MomentState) -> float:
    """Largest relative difference over n, mean, M2, min, max (infinities must agree)."""
    worst = 0.0
    for x, y in zip(a.to_dict().values(), b.to_dict().values(), strict=True):
        finite = torch.isfinite(y)
        assert torch.equal(finite, torch.isfinite(x))
        if not bool(finite.any()):
            continue
        assert torch.equal(x[~finite], y[~finite])
        xf, yf = x[finite], y[finite]
        scale = torch.linalg.norm(yf).clamp_min(1e-300)
        worst = max(worst, float(torch.linalg.norm(xf - yf) / scale))
    return worst
