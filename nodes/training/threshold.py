"""Decision-threshold calibration from streaming, mergeable score histograms.

A validation session has millions of pixels, so scores are never kept: :class:`ScoreHistogram`
counts them in fixed bins (float64 counts, normal and anomalous pixels apart), can be updated batch
by batch, merged across workers and checkpointed as a plain tensor dict — the
:class:`~nodes.accumulators.Accumulator` contract of the Phase-1 statistics; binning and curves
are :mod:`nodes.accumulators`' (shared with the AP / AUROC metric).

Thresholds are chosen among the bin edges, where the counts answer exactly how many pixels score
``>= t``: the confusion matrix at every edge comes from one reverse cumulative sum.

* :func:`threshold_at_fpr` — the Neyman-Pearson detector: the lowest edge whose false-positive
  rate on normal pixels is at most the target (needs no anomaly labels); it lies within one bin
  width above the empirical ``1 - target_fpr`` quantile of the normal scores.
* :func:`threshold_at_max_f1` — the edge maximising F1 = 2TP / (2TP + FP + FN) (needs anomalies);
  on a run of edges with equal counts, the middle of the empty gap is returned.
* :func:`calibrate_threshold` — either of the two ("auto": max F1 when anomalies are present),
  with the achieved FPR / TPR / precision / F1.

Thresholds are in the units of the scores fed in. The pipeline feeds logits while
``BinaryDecider`` compares ``sigmoid(logit)`` with a probability; :func:`logit_to_probability`
converts (sigmoid is monotone, so ``logit >= t`` and ``sigmoid(logit) >= sigmoid(t)`` agree up to
float32 saturation of the sigmoid beyond about ±17).

Why one module of about 400 lines: the histogram, its curve and the calibration rules are
one unit (the rules read only the histogram's curve); apart they would import each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from nodes.accumulators import BinnedCurve, count_slots
from nodes.errors import ConfigError, DataValidationError

__all__ = [
    "ScoreHistogram",
    "ThresholdCalibration",
    "calibrate_threshold",
    "logit_to_probability",
    "probability_to_logit",
    "threshold_at_fpr",
    "threshold_at_max_f1",
]

Method = Literal["auto", "fpr", "max_f1"]


class ScoreHistogram:
    """Fixed-bin histogram of scores, counted separately for normal and anomalous pixels.

    Bins split ``[low, high)`` into ``n_bins`` equal parts; one underflow slot (``< low``) and one
    overflow slot (``>= high``) keep out-of-range scores, so counts at every edge stay exact.
    Pixel ``i`` lands in the bin ``[edges[j], edges[j + 1])`` that holds it, decided by comparing
    with the same float64 edges the thresholds are taken from.

    Args:
        low: Lower end of the binned range (scores' units; logits: e.g. -30).
        high: Upper end of the binned range.
        n_bins: Number of equal bins; the threshold resolution is ``(high - low) / n_bins``.
    """

    def __init__(self, low: float = -30.0, high: float = 30.0, n_bins: int = 4096) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(
                f"ScoreHistogram needs finite low < high, got low={low}, high={high}; "
                "give the range the scores live in (e.g. -30, 30 for logits)."
            )
        if int(n_bins) != n_bins or n_bins < 1:
            raise ConfigError(f"ScoreHistogram n_bins must be a positive integer, got {n_bins}.")
        self.low = float(low)
        self.high = float(high)
        self.n_bins = int(n_bins)
        self.edges = torch.linspace(self.low, self.high, self.n_bins + 1, dtype=torch.float64)
        # Slot 0 is the underflow, slots 1..n_bins the bins, slot n_bins + 1 the overflow.
        self.counts_normal = torch.zeros(self.n_bins + 2, dtype=torch.float64)
        self.counts_anomalous = torch.zeros(self.n_bins + 2, dtype=torch.float64)

    @classmethod
    def for_logits(cls, bound: float = 30.0, n_bins: int = 4096) -> ScoreHistogram:
        """Histogram over ``[-bound, bound]``, the range of useful logits."""
        return cls(-bound, bound, n_bins)

    @classmethod
    def for_probabilities(cls, n_bins: int = 4096) -> ScoreHistogram:
        """Histogram over ``[0, 1]`` for scores already passed through a sigmoid."""
        return cls(0.0, 1.0, n_bins)

    @property
    def bin_width(self) -> float:
        """Width of one bin, the resolution of the thresholds."""
        return (self.high - self.low) / self.n_bins

    @property
    def n_normal(self) -> int:
        """Number of normal pixels counted."""
        return int(self.counts_normal.sum().item())

    @property
    def n_anomalous(self) -> int:
        """Number of anomalous pixels counted."""
        return int(self.counts_anomalous.sum().item())

    @property
    def n_out_of_range(self) -> int:
        """Pixels below ``low`` or at/above ``high`` (many: the range is too small)."""
        total = self.counts_normal + self.counts_anomalous
        return int((total[0] + total[-1]).item())

    def update(self, scores: Tensor, targets: Tensor, valid: Tensor | None = None) -> None:
        """Count one batch of scores.

        Args:
            scores: Scores of any shape, e.g. (B, H, W) or (B, H, W, 1).
            targets: Anomaly labels with the shape of ``scores`` (a trailing singleton channel of
                ``scores`` is ignored); non-zero means anomalous.
            valid: Optional boolean mask of the same shape; pixels where it is False are skipped.

        Raises:
            DataValidationError: On shape mismatch or NaN scores (nothing is counted then).
        """
        s = torch.as_tensor(scores).detach()
        t = torch.as_tensor(targets).detach()
        if s.ndim == t.ndim + 1 and s.shape[-1] == 1:
            s = s.squeeze(-1)
        if s.shape != t.shape:
            raise DataValidationError(
                f"ScoreHistogram.update: scores shape {tuple(s.shape)} does not match targets "
                f"shape {tuple(t.shape)}; pass per-pixel scores and the matching mask."
            )
        s = s.to("cpu", torch.float64).reshape(-1)
        t = t.to("cpu").reshape(-1) != 0
        if valid is not None:
            v = torch.as_tensor(valid).detach().to("cpu")
            if v.shape != torch.as_tensor(targets).shape:
                raise DataValidationError(
                    f"ScoreHistogram.update: valid shape {tuple(v.shape)} does not match targets "
                    f"shape {tuple(torch.as_tensor(targets).shape)}."
                )
            keep = v.reshape(-1).to(torch.bool)
            s, t = s[keep], t[keep]
        n_nan = int(torch.isnan(s).sum().item())
        if n_nan:
            raise DataValidationError(
                f"ScoreHistogram.update: {n_nan} NaN score(s); NaN scores usually come from an "
                "unfitted or diverged node. Check the model's outputs before calibrating."
            )
        normal, anomalous = count_slots(s, t, self.edges)
        self.counts_normal += normal.to(torch.float64)
        self.counts_anomalous += anomalous.to(torch.float64)

    def _check_compatible(self, other: ScoreHistogram) -> None:
        if (self.low, self.high, self.n_bins) != (other.low, other.high, other.n_bins):
            raise ConfigError(
                "Cannot merge ScoreHistograms with different bins: "
                f"[{self.low}, {self.high}) x {self.n_bins} vs "
                f"[{other.low}, {other.high}) x {other.n_bins}; build both with the same range."
            )

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        """Add ``other``'s counts into this histogram (in place) and return it.

        Counts are integers held in float64, so merging is exact (below 2**53 pixels) and the
        order of merges does not matter.
        """
        self._check_compatible(other)
        self.counts_normal += other.counts_normal
        self.counts_anomalous += other.counts_anomalous
        return self

    def compute(self) -> ThresholdCalibration:
        """The calibrated threshold (``calibrate_threshold(self)``, method ``"auto"``)."""
        return calibrate_threshold(self)

    def curve(self) -> BinnedCurve:
        """Confusion counts at ``-inf``, every edge and ``+inf``."""
        return BinnedCurve.from_counts(self.edges, self.counts_normal, self.counts_anomalous)

    def reset(self) -> None:
        """Clear the counts (same bins)."""
        self.counts_normal.zero_()
        self.counts_anomalous.zero_()

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensor state for checkpoints and inter-process transfer."""
        return {
            "range": torch.tensor([self.low, self.high], dtype=torch.float64),
            "counts_normal": self.counts_normal.clone(),
            "counts_anomalous": self.counts_anomalous.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> ScoreHistogram:
        """Restore :meth:`state_dict` output into this histogram (its bins must match)."""
        other = ScoreHistogram.from_state_dict(state)
        self._check_compatible(other)
        self.counts_normal = other.counts_normal
        self.counts_anomalous = other.counts_anomalous
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ScoreHistogram:
        """Rebuild a histogram from :meth:`state_dict` output."""
        missing = {"range", "counts_normal", "counts_anomalous"} - set(state)
        if missing:
            raise ConfigError(
                f"ScoreHistogram state lacks {sorted(missing)}; pass ScoreHistogram.state_dict()."
            )
        cn = torch.as_tensor(state["counts_normal"], dtype=torch.float64)
        ca = torch.as_tensor(state["counts_anomalous"], dtype=torch.float64)
        rng = torch.as_tensor(state["range"], dtype=torch.float64)
        if cn.ndim != 1 or cn.shape != ca.shape or cn.numel() < 3 or rng.shape != (2,):
            raise ConfigError(
                "ScoreHistogram state is malformed: counts must be two equal 1-D tensors of "
                "n_bins + 2 entries and range a 2-vector."
            )
        hist = cls(float(rng[0]), float(rng[1]), cn.numel() - 2)
        hist.counts_normal = cn.clone()
        hist.counts_anomalous = ca.clone()
        return hist

    def __repr__(self) -> str:
        return (
            f"ScoreHistogram(low={self.low}, high={self.high}, n_bins={self.n_bins}, "
            f"n_normal={self.n_normal}, n_anomalous={self.n_anomalous})"
        )


@dataclass(frozen=True)
class ThresholdCalibration:
    """A calibrated threshold and what it achieves on the calibration histogram.

    Rates are for the rule ``score >= threshold``. ``tpr``, ``precision`` and ``f1`` are None
    when the histogram holds no anomalous pixel (precision also when nothing is flagged).
    """

    threshold: float
    method: Literal["fpr", "max_f1"]
    fpr: float
    tpr: float | None
    precision: float | None
    f1: float | None
    target_fpr: float | None
    n_normal: int
    n_anomalous: int

    @property
    def probability(self) -> float:
        """The threshold as a sigmoid probability (meaningful when the scores were logits)."""
        return logit_to_probability(self.threshold)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (e.g. for MLflow params/metrics), ``probability`` included."""
        return {**asdict(self), "probability": self.probability}


def logit_to_probability(logit: float) -> float:
    """Numerically stable sigmoid of a logit threshold (``±inf`` map to 1 and 0)."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    e = math.exp(logit)
    return e / (1.0 + e)


def probability_to_logit(probability: float) -> float:
    """Inverse of :func:`logit_to_probability` (0 and 1 map to ``-inf`` and ``inf``)."""
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"probability must lie in [0, 1], got {probability}.")
    if probability == 0.0:
        return -math.inf
    if probability == 1.0:
        return math.inf
    return math.log(probability) - math.log1p(-probability)


# --------------------------------------------------------------------------------------------
# confusion counts at every candidate threshold
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Curve:
    """The histogram's curve as numpy, candidates restricted to the edges and ``+inf``.

    ``-inf`` (flag everything, underflow included) is not a threshold one can calibrate to.
    """

    thresholds: np.ndarray
    fp: np.ndarray
    tp: np.ndarray
    n_normal: float
    n_anomalous: float


def _curve(hist: ScoreHistogram) -> _Curve:
    curve = hist.curve()
    return _Curve(
        thresholds=curve.thresholds[1:].numpy(),
        fp=curve.fp[1:].numpy(),
        tp=curve.tp[1:].numpy(),
        n_normal=curve.n_normal,
        n_anomalous=curve.n_anomalous,
    )


def _check_fpr(target_fpr: float) -> None:
    if not (isinstance(target_fpr, int | float) and 0.0 <= target_fpr <= 1.0):
        raise ConfigError(f"target_fpr must lie in [0, 1], got {target_fpr!r} (e.g. 1e-3).")


def _fpr_index(curve: _Curve, target_fpr: float) -> int:
    if curve.n_normal == 0:
        raise DataValidationError(
            "Threshold at target FPR needs normal pixels, but the histogram holds none; feed "
            "frames whose mask has background (mask == 0) pixels."
        )
    fpr = curve.fp / curve.n_normal
    # fp falls with the index, so the first feasible candidate is the lowest threshold.
    return int(np.argmax(fpr <= target_fpr))


def _f1_curve(curve: _Curve) -> np.ndarray:
    if curve.n_anomalous == 0:
        raise DataValidationError(
            "Threshold at max F1 needs anomalous pixels, but the histogram holds none; feed "
            "labelled frames with anomalies (mask == 1) or use method='fpr'."
        )
    # 2TP / (2TP + FP + FN) with FN = N_anomalous - TP.
    return 2 * curve.tp / (curve.tp + curve.fp + curve.n_anomalous)


def _max_f1_threshold(curve: _Curve) -> tuple[int, float]:
    f1 = _f1_curve(curve)
    k0 = int(np.argmax(f1))
    k1 = k0
    last_edge = len(curve.thresholds) - 2
    # Extend over the edges with identical counts (empty bins between them) and take the middle
    # of that gap: all of it scores the same here, the middle keeps the widest margin.
    while k1 < last_edge and curve.tp[k1 + 1] == curve.tp[k0] and curve.fp[k1 + 1] == curve.fp[k0]:
        k1 += 1
    threshold = float(curve.thresholds[k0] + curve.thresholds[k1]) / 2.0
    return k0, threshold


def threshold_at_fpr(hist: ScoreHistogram, target_fpr: float = 1e-3) -> float:
    """Lowest bin edge whose false-positive rate on the normal pixels is at most ``target_fpr``.

    Anomalous pixels are not needed (and not used). Returns ``inf`` when even the top edge flags
    too many normal pixels (the range of the histogram is too small then).

    Raises:
        ConfigError: When ``target_fpr`` is outside [0, 1].
        DataValidationError: When the histogram holds no normal pixel.
    """
    _check_fpr(target_fpr)
    curve = _curve(hist)
    return float(curve.thresholds[_fpr_index(curve, target_fpr)])


def threshold_at_max_f1(hist: ScoreHistogram) -> float:
    """Threshold maximising F1 over the bin edges (middle of a tie's empty gap).

    Raises:
        DataValidationError: When the histogram holds no anomalous pixel.
    """
    return _max_f1_threshold(_curve(hist))[1]


def _summary(
    curve: _Curve,
    k: int,
    threshold: float,
    method: Literal["fpr", "max_f1"],
    target_fpr: float | None,
) -> ThresholdCalibration:
    tp, fp = float(curve.tp[k]), float(curve.fp[k])
    fpr = fp / curve.n_normal if curve.n_normal else 0.0
    tpr = precision = f1 = None
    if curve.n_anomalous:
        tpr = tp / curve.n_anomalous
        precision = tp / (tp + fp) if tp + fp else None
        f1 = 2 * tp / (tp + fp + curve.n_anomalous)
    return ThresholdCalibration(
        threshold=threshold,
        method=method,
        fpr=fpr,
        tpr=tpr,
        precision=precision,
        f1=f1,
        target_fpr=target_fpr,
        n_normal=int(curve.n_normal),
        n_anomalous=int(curve.n_anomalous),
    )


def calibrate_threshold(
    hist: ScoreHistogram, method: Method = "auto", target_fpr: float = 1e-3
) -> ThresholdCalibration:
    """Calibrate a decision threshold and report what it achieves.

    Args:
        hist: Scores counted on calibration (validation) frames.
        method: ``"fpr"`` (at most ``target_fpr`` false positives), ``"max_f1"`` (needs anomalies),
            or ``"auto"``: max F1 when the histogram holds anomalous pixels, else FPR.
        target_fpr: Target false-positive rate of the ``"fpr"`` method.

    Returns:
        The threshold (scores' units; ``.probability`` for the sigmoid form) with its FPR, TPR,
        precision and F1 on ``hist``.

    Raises:
        ConfigError: On an unknown method or a target_fpr outside [0, 1].
        DataValidationError: When the histogram lacks the pixels the method needs.
    """
    if method not in ("auto", "fpr", "max_f1"):
        raise ConfigError(f"Unknown calibration method {method!r}; use 'auto', 'fpr' or 'max_f1'.")
    curve = _curve(hist)
    if method == "auto":
        method = "max_f1" if curve.n_anomalous > 0 else "fpr"
    if method == "max_f1":
        k, threshold = _max_f1_threshold(curve)
        return _summary(curve, k, threshold, "max_f1", None)
    _check_fpr(target_fpr)
    k = _fpr_index(curve, target_fpr)
    return _summary(curve, k, float(curve.thresholds[k]), "fpr", target_fpr)
