"""Metric node: IoU, F1, precision, recall, AP and AUROC over pixels, in bounded memory.

Counts come from torchmetrics' ``BinaryStatScores``; AP and AUROC use torchmetrics' *binned*
implementations (a fixed threshold grid), so memory does not grow with the number of pixels
and the states all-reduce across DDP ranks. The grid is uniform in logit space (passed through a
gentle sigmoid so that float32 does not saturate before |logit| ≈ 100).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryStatScores

from nodes.base import Node
from nodes.ports import PortSpec
from nodes.registry import register_node

_MAP = ("B", "H", "W")
#: Logits are divided by this before the sigmoid of the binned metrics (monotone, so AP/AUROC
#: are unchanged up to binning).
_LOGIT_SOFTENING = 8.0


@register_node
class AnomalyDetectionMetrics(Node):
    """Accumulate pixel metrics over an epoch; ``compute()`` returns them by name.

    Inputs ``decisions`` and ``targets`` give IoU, F1, precision and recall. Connect the optional
    ``logits`` input to get threshold-free AP and AUROC; without it they are computed from the
    binary decisions.

    Args:
        name: Node name; metrics are reported as ``<name>/<metric>``.
        num_thresholds: Size of the threshold grid of AP/AUROC.
        logit_range: Logit span covered by the grid.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "decisions": PortSpec("bool", _MAP, "predicted anomaly mask"),
        "targets": PortSpec("bool", _MAP, "ground-truth anomaly mask"),
        "logits": PortSpec("float", _MAP, "anomaly logits (for AP/AUROC)", optional=True),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {}
    DEFAULT_STAGES: ClassVar[frozenset[str]] = frozenset({"val", "test"})
    METRIC_NAMES: ClassVar[tuple[str, ...]] = ("iou", "f1", "precision", "recall", "ap", "auroc")

    def __init__(self, name: str = "metrics_anomaly", num_thresholds: int = 2001,
                 logit_range: float = 40.0, **kwargs: object) -> None:
        super().__init__(name=name, **kwargs)  # type: ignore[arg-type]
        self._remember(num_thresholds=int(num_thresholds), logit_range=float(logit_range))
        grid = torch.sigmoid(torch.linspace(-logit_range, logit_range, int(num_thresholds))
                             / _LOGIT_SOFTENING)
        self.stat_scores = BinaryStatScores(threshold=0.5)
        self.ap = BinaryAveragePrecision(thresholds=grid)
        self.auroc = BinaryAUROC(thresholds=grid)
        self._has_scores = False

    def forward(  # type: ignore[override]
        self, decisions: Tensor, targets: Tensor, logits: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Update the running state with one batch."""
        t = targets.reshape(-1).long()
        self.stat_scores.update(decisions.reshape(-1).float(), t)
        if logits is not None:
            self._has_scores = True
            probs = torch.sigmoid(logits.detach().reshape(-1).float() / _LOGIT_SOFTENING)
        else:
            probs = decisions.reshape(-1).float()
        self.ap.update(probs, t)
        self.auroc.update(probs, t)
        return {}

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen since the last :meth:`reset`."""
        tp, fp, tn, fn, _ = (float(v) for v in self.stat_scores.compute())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        iou = tp / (tp + fp + fn) if tp + fp + fn else 0.0
        out = {"iou": iou, "f1": f1, "precision": precision, "recall": recall}
        if tp + fn > 0 and tn + fp > 0:
            out["ap"] = float(self.ap.compute())
            out["auroc"] = float(self.auroc.compute())
        else:  # one class only: AP/AUROC undefined
            out["ap"] = float("nan")
            out["auroc"] = float("nan")
        return out

    def reset(self) -> None:
        """Clear the running state (start of an epoch)."""
        self.stat_scores.reset()
        self.ap.reset()
        self.auroc.reset()
