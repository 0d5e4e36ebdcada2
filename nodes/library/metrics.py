"""Metric node: IoU, F1, precision, recall, AP and AUROC over pixels, in bounded memory.

Counts come from torchmetrics' ``BinaryStatScores``; AP and AUROC are *binned*: a torchmetrics
``Metric`` counts normal and anomalous pixels per logit bin (``bucketize`` + ``bincount``, so an
update is O(N log T) instead of the O(N·T) comparisons of a threshold sweep), and the precision-
recall and ROC curves at every bin edge follow from reverse cumulative sums
(:mod:`nodes.accumulators`, shared with threshold calibration). Memory does not grow
with the number of pixels and the states all-reduce (sum) across DDP ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryStatScores

from nodes.accumulators import BinnedCurve, count_slots
from nodes.errors import NoAnomaliesWarning
from nodes.graph.base import Node
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node

_MAP = ("B", "H", "W")


class BinnedScoreCounts(Metric):
    """Per-bin counts of normal and anomalous scores on a fixed grid; AP and AUROC from them.

    The counting (:func:`~nodes.accumulators.count_slots`) and the curves
    (:class:`~nodes.accumulators.BinnedCurve`) are the ones threshold calibration uses; this
    class adds torchmetrics' state handling (DDP all-reduce, ``merge_state``) and follows the
    :class:`~nodes.accumulators.Accumulator` contract. Its counts stay out of the pipeline's
    ``state_dict`` (torchmetrics' default, so saved weights hold no epoch counts); call
    ``persistent(True)`` to checkpoint them.

    Args:
        low: Lowest bin edge.
        high: Highest bin edge.
        num_bins: Number of bins between the edges (plus an underflow and an overflow bin).
    """

    full_state_update = False
    normal: Tensor
    anomalous: Tensor
    edges: Tensor

    def __init__(self, low: float = -40.0, high: float = 40.0, num_bins: int = 4000) -> None:
        super().__init__()
        self.register_buffer("edges", torch.linspace(low, high, num_bins + 1), persistent=False)
        for state in ("normal", "anomalous"):
            self.add_state(state, torch.zeros(num_bins + 2, dtype=torch.long),
                           dist_reduce_fx="sum")

    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Count a batch of scores (any shape) with boolean targets of the same shape."""
        normal, anomalous = count_slots(scores, targets, self.edges)
        self.normal += normal
        self.anomalous += anomalous

    def merge(self, other: BinnedScoreCounts) -> BinnedScoreCounts:
        """Add ``other``'s counts into this metric (in place) and return it."""
        self.merge_state(other)
        return self

    def curve(self) -> BinnedCurve:
        """The confusion counts at every bin edge."""
        return BinnedCurve.from_counts(self.edges, self.normal, self.anomalous)

    def compute(self) -> dict[str, Tensor]:
        """AP and AUROC of the rule ``score >= edge`` over every edge."""
        curve = self.curve()
        return {"ap": torch.tensor(curve.average_precision(), dtype=torch.float64),
                "auroc": torch.tensor(curve.auroc(), dtype=torch.float64)}


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
    DEFAULT_NAME: ClassVar[str | None] = "metrics_anomaly"

    def __init__(self, name: str | None = None, num_thresholds: int = 4000,
                 logit_range: float = 40.0, execution_stages: Iterable[str] | None = None) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        self._remember(num_thresholds=int(num_thresholds), logit_range=float(logit_range))
        self.stat_scores = BinaryStatScores(threshold=0.5)
        self.curves = BinnedScoreCounts(-logit_range, logit_range, int(num_thresholds))

    def forward(  # type: ignore[override]
        self, decisions: Tensor, targets: Tensor, logits: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Update the running state with one batch."""
        t = targets.reshape(-1).long()
        self.stat_scores.update(decisions.reshape(-1).float(), t)
        scores = logits if logits is not None else decisions.float()
        self.curves.update(scores, targets)
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
            curves = self.curves.compute()
            out["ap"] = float(curves["ap"])
            out["auroc"] = float(curves["auroc"])
        else:  # one class only: AP/AUROC undefined
            out["ap"] = float("nan")
            out["auroc"] = float("nan")
        return out

    @property
    def positives(self) -> int:
        """Anomalous pixels seen since the last :meth:`reset` (true positives + false negatives)."""
        return int(self.curves.anomalous.sum())

    @property
    def pixels(self) -> int:
        """Pixels seen since the last :meth:`reset`."""
        return int(self.curves.anomalous.sum() + self.curves.normal.sum())

    def reset(self) -> None:
        """Clear the running state (start of an epoch)."""
        self.stat_scores.reset()
        self.curves.reset()


def warn_if_no_anomalies(metric_nodes: Iterable[AnomalyDetectionMetrics], split: str,
                         frame_ids: Sequence[int] | None, pipeline: Any = None) -> bool:
    """Warn (:class:`~nodes.errors.NoAnomaliesWarning`) when an evaluated split had no anomaly.

    Without one anomalous pixel IoU, F1 and recall are 0 and AP/AUROC NaN whatever the model
    does; the usual cause is ``normal_class_ids`` listing the anomaly class too (the guide's
    ``[0, 1]`` on data whose class 1 is the anomaly). The message names the frames and the ids.

    Args:
        metric_nodes: The metric nodes after an evaluation pass.
        split: The split's name (``"val"``, ``"test"``).
        frame_ids: Frame ids of the split, where known.
        pipeline: The pipeline, to name its data node's ``normal_class_ids``.

    Returns:
        True when it warned.
    """
    nodes = [m for m in metric_nodes if m.pixels > 0]
    if not nodes or any(m.positives > 0 for m in nodes):
        return False
    ids = "" if frame_ids is None else f" (frame ids {sorted(set(frame_ids))})"
    cls = ""
    if pipeline is not None:
        for node in pipeline.node_list():
            if hasattr(node, "normal_class_ids") and node.consumes_batch:
                cls = (f" with normal_class_ids={list(node.normal_class_ids)} of data node "
                       f"{node.name!r}")
                break
    warnings.warn(
        f"the {split} split{ids} holds no anomalous pixel{cls}: IoU, F1 and recall are 0 and "
        "AP/AUROC NaN whatever the model does. Check that normal_class_ids lists only the "
        "normal classes (class ids outside it are anomalies) and that the split's frames hold "
        "anomalies.",
        NoAnomaliesWarning,
        stacklevel=2,
    )
    return True
