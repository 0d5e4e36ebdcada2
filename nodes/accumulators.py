"""The accumulator contract, and the one binned score-curve implementation of the project.

Everything cubeline sums over a dataset in bounded memory follows one contract,
:class:`Accumulator` (torchmetrics' ``Metric`` is the model): ``update`` with a batch, ``merge``
another accumulator's samples in (workers, shards, DDP ranks), ``compute`` the result,
``reset`` to empty, and ``state_dict`` / ``load_state_dict`` as plain tensors (checkpoints,
inter-process transfer, ``torch.load(weights_only=True)``). The implementations:

* :class:`nodes.training.stats.MomentAccumulator` -- float64 count / mean / M2 / min / max
  (Phase 1);
* :class:`nodes.training.threshold.ScoreHistogram` -- per-bin counts of normal and anomalous
  scores, for threshold calibration;
* :class:`nodes.library.metrics.BinnedScoreCounts` -- the same counts as a torchmetrics metric,
  for AP / AUROC during training and evaluation.

Both score counters bin with :func:`count_slots` and read their curves from
:class:`BinnedCurve`; evaluation plots and reports build the same curve from in-memory scores
with :meth:`BinnedCurve.from_samples`. Exact (sorting) curves exist only as the tests' oracle.

This module sits outside the ``graph -> library -> training`` layers so that every layer can
use it; it imports nothing from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = ["SAMPLE_BINS", "Accumulator", "BinnedCurve", "count_slots", "sample_edges"]

SAMPLE_BINS = 8192
"""Equal-width bins (and as many equal-count bins) of curves built from in-memory scores."""


@runtime_checkable
class Accumulator(Protocol):
    """What every streaming, mergeable accumulator of cubeline provides."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Fold one batch into the state."""

    def merge(self, other: Any) -> Any:
        """Add another accumulator's samples into this one (in place) and return ``self``."""

    def compute(self) -> Any:
        """The result over everything seen since the last :meth:`reset`."""

    def reset(self) -> None:
        """Return to the empty state (same configuration)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensor state (checkpoints, transfer between processes)."""

    def load_state_dict(self, state: dict[str, Tensor]) -> Any:
        """Restore the state written by :meth:`state_dict`."""


def count_slots(scores: Tensor, targets: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Count normal and anomalous scores per slot of ``edges``.

    Slot 0 holds scores below ``edges[0]``, slot ``k`` (1..n) the scores in
    ``[edges[k-1], edges[k])``, slot ``n + 1`` those at or above ``edges[-1]``, where ``n + 1`` is
    the number of edges. Scores are compared in ``edges``' dtype and device.

    Args:
        scores: Scores of any shape.
        targets: Labels with as many elements; non-zero means anomalous.
        edges: Increasing bin edges (1-D).

    Returns:
        ``(normal, anomalous)``: two int64 tensors of ``len(edges) + 1`` counts.
    """
    s = scores.detach().reshape(-1).to(edges.device, edges.dtype)
    t = targets.detach().reshape(-1).to(edges.device) != 0
    slot = torch.bucketize(s, edges, right=True)
    size = edges.numel() + 1
    both = torch.bincount(slot * 2 + t.to(torch.int64), minlength=2 * size).reshape(size, 2)
    return both[:, 0], both[:, 1]


def sample_edges(scores: np.ndarray, n_bins: int = SAMPLE_BINS) -> np.ndarray:
    """Bin edges for scores held in memory: equal-width and equal-count edges merged.

    Equal-width edges resolve the sparse tail where anomalies score; equal-count (quantile)
    edges resolve the dense bulk of normal pixels, so no bin holds more than about
    ``1 / n_bins`` of the pixels and the binned AUROC / AP stay within about that of the exact
    values.

    Args:
        scores: Finite scores of any shape.
        n_bins: Bins of each kind.

    Returns:
        Strictly increasing float64 edges spanning ``[min, max]`` of the scores.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return np.array([lo, lo + 1.0])
    quantiles = np.quantile(s, np.linspace(0.0, 1.0, n_bins + 1))
    return np.unique(np.concatenate([np.linspace(lo, hi, n_bins + 1), quantiles]))


@dataclass(frozen=True)
class BinnedCurve:
    """Confusion counts of the rule ``score >= t`` at every candidate threshold ``t``.

    Candidates, increasing: ``-inf`` (flags every pixel), each bin edge, ``+inf`` (flags none).
    ``tp[i]`` / ``fp[i]`` are the anomalous / normal pixels flagged at ``thresholds[i]``.

    Attributes:
        thresholds: float64, ``len(edges) + 2`` candidates.
        tp: float64 true positives per candidate (non-increasing).
        fp: float64 false positives per candidate (non-increasing).
    """

    thresholds: Tensor
    tp: Tensor
    fp: Tensor

    @classmethod
    def from_counts(cls, edges: Tensor, normal: Tensor, anomalous: Tensor) -> BinnedCurve:
        """The curve of slot counts as written by :func:`count_slots`."""

        def flagged(counts: Tensor) -> Tensor:
            # tail[j] = pixels in slots >= j: edge k flags slots >= k + 1, -inf flags slot 0 up.
            tail = counts.to(torch.float64).flip(0).cumsum(0).flip(0)
            return torch.cat([tail, tail.new_zeros(1)])

        inf = torch.tensor([torch.inf], dtype=torch.float64, device=edges.device)
        return cls(
            thresholds=torch.cat([-inf, edges.to(torch.float64), inf]),
            tp=flagged(anomalous),
            fp=flagged(normal),
        )

    @classmethod
    def from_samples(
        cls, scores: np.ndarray | Tensor, targets: np.ndarray | Tensor, n_bins: int = SAMPLE_BINS
    ) -> BinnedCurve:
        """The curve of scores held in memory, on :func:`sample_edges` edges."""
        s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        t = torch.as_tensor(np.asarray(targets, dtype=bool))
        edges = torch.from_numpy(sample_edges(s.numpy(), n_bins))
        normal, anomalous = count_slots(s, t, edges)
        return cls.from_counts(edges, normal, anomalous)

    @property
    def n_anomalous(self) -> float:
        """Anomalous pixels counted."""
        return float(self.tp[0])

    @property
    def n_normal(self) -> float:
        """Normal pixels counted."""
        return float(self.fp[0])

    def roc(self) -> tuple[Tensor, Tensor]:
        """``(fpr, tpr)`` from ``(0, 0)`` to ``(1, 1)`` (thresholds decreasing)."""
        tp, fp = self.tp.flip(0), self.fp.flip(0)
        return fp / fp[-1].clamp_min(1), tp / tp[-1].clamp_min(1)

    def precision_recall(self) -> tuple[Tensor, Tensor]:
        """``(precision, recall)``, thresholds decreasing; precision 1 where nothing is flagged."""
        tp, fp = self.tp.flip(0), self.fp.flip(0)
        flagged = tp + fp
        precision = torch.where(flagged > 0, tp / flagged.clamp_min(1), torch.ones_like(tp))
        return precision, tp / tp[-1].clamp_min(1)

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoids; NaN when one class is missing)."""
        if self.n_anomalous == 0 or self.n_normal == 0:
            return float("nan")
        fpr, tpr = self.roc()
        return float(torch.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Step-wise area under the precision-recall curve, ``sum (R_n - R_{n-1}) P_n``.

        NaN without anomalous pixels.
        """
        if self.n_anomalous == 0:
            return float("nan")
        precision, recall = self.precision_recall()
        return float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())

    def f1(self) -> Tensor:
        """F1 = 2TP / (2TP + FP + FN) at every candidate (needs anomalous pixels)."""
        return 2 * self.tp / (self.tp + self.fp + self.n_anomalous)
