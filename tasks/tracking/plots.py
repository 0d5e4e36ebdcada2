"""Evaluation artifacts: ROC and precision-recall curves, score histograms, anomaly maps.

Curves and their areas come from :class:`nodes.accumulators.BinnedCurve`, the one binned-curve
implementation of the project, on ``SAMPLE_BINS`` equal-width plus as many equal-count bins
(within about ``1 / SAMPLE_BINS`` of the exact sorting curves, which the tests use as oracle).
Average precision is the step-wise area, as in scikit-learn. matplotlib is imported only when a
plot is drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nodes.accumulators import BinnedCurve
from nodes.errors import DataValidationError
from tasks.tracking.lineage import _resolve_run_id


def _curve(scores: np.ndarray, targets: np.ndarray) -> BinnedCurve:
    return BinnedCurve.from_samples(scores, targets)


def roc_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Return ``(fpr, tpr, auc)`` of a score map against boolean targets (binned, see module).

    AUC is NaN when the targets hold only one class.
    """
    curve = _curve(scores, targets)
    fpr, tpr = curve.roc()
    return fpr.numpy(), tpr.numpy(), curve.auroc()


def pr_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(recall, precision)`` ordered by increasing recall, from (0, 1)."""
    precision, recall = _curve(scores, targets).precision_recall()
    return recall.numpy(), precision.numpy()


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve, ``sum (R_n - R_{n-1}) P_n`` (binned)."""
    return _curve(scores, targets).average_precision()


def _check_eval_inputs(
    scores: np.ndarray, targets: np.ndarray, frame_ids: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    t = np.asarray(targets)
    if s.ndim != 3:
        raise DataValidationError(
            f"log_evaluation: scores must be (N, H, W), got shape {s.shape}. Fix: pass the "
            "per-pixel anomaly scores of the test frames stacked on axis 0."
        )
    if t.shape != s.shape:
        raise DataValidationError(
            f"log_evaluation: targets shape {t.shape} differs from scores shape {s.shape}. Fix: "
            "pass the ground-truth masks of the same frames."
        )
    if len(frame_ids) != s.shape[0]:
        raise DataValidationError(
            f"log_evaluation: {len(frame_ids)} frame ids for {s.shape[0]} frames. Fix: one id "
            "per frame, in the order of axis 0."
        )
    if not np.all(np.isfinite(s)):
        bad = int(np.size(s) - np.count_nonzero(np.isfinite(s)))
        raise DataValidationError(
            f"log_evaluation: scores hold {bad} non-finite values (NaN/inf). Fix: check the "
            "model (an unfitted or diverged node) before evaluating."
        )
    return s.astype(np.float64, copy=False), t.astype(bool, copy=False)


def _safe_name(frame_id: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(frame_id)).strip("._") or "frame"


def _figure(width: float, height: float) -> Any:
    """A headless Agg figure without pyplot (no global figure registry, no GUI backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Any, path: Path) -> Path:
    import io

    from tasks.env import atomic_write_bytes

    # A fixed layout (set per figure) instead of bbox_inches="tight", which draws twice.
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """At most ``max_points`` points of a monotone curve, its first and last kept."""
    if x.size <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
    return x[keep], y[keep]


def write_anomaly_maps(
    scores: np.ndarray,
    frame_ids: Sequence[Any],
    out_dir: Path,
    targets: np.ndarray | None = None,
    *,
    decisions: np.ndarray | None = None,
    score_label: str = "anomaly score",
    title_suffix: str = "",
) -> dict[str, Path]:
    """Write one PNG per frame: the score map, the model's decisions and the ground truth.

    The colour scale runs from the 1st to the 99.5th percentile of the frame's scores, so a few
    extreme pixels cannot turn the rest of the map black (the colour bar says so). Ground truth
    is a cyan outline and the model's decisions a magenta one, both named in a legend.

    Args:
        scores: (N, H, W) scores, all in one unit.
        frame_ids: One id per frame (used in titles and file names).
        out_dir: Directory for ``anomaly_map_<frame_id>.png``.
        targets: Optional (N, H, W) boolean ground truth.
        decisions: Optional (N, H, W) boolean decisions of the model.
        score_label: The unit of ``scores`` (raw RX score, logit, ...), on the colour bar.
        title_suffix: Added to each title (e.g. the model version).

    Returns:
        ``{"anomaly_map:<frame_id>": path}`` in frame order.
    """
    from matplotlib.lines import Line2D

    s = np.asarray(scores, dtype=np.float64)
    t = np.zeros(s.shape, dtype=bool) if targets is None else np.asarray(targets, dtype=bool)
    s, t = _check_eval_inputs(s, t, frame_ids)
    d = None if decisions is None else np.asarray(decisions, dtype=bool).reshape(s.shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    used: set[str] = set()
    for i, fid in enumerate(frame_ids):
        name = _safe_name(fid)
        while name in used:  # two ids that sanitize alike must not overwrite each other
            name += f"_{i}"
        used.add(name)
        fig = _figure(5.4, 5.0)
        ax = fig.add_axes((0.02, 0.1, 0.74, 0.8))
        cax = fig.add_axes((0.8, 0.14, 0.035, 0.72))
        finite = s[i][np.isfinite(s[i])]
        lo, hi = (np.percentile(finite, [1.0, 99.5]) if finite.size else (0.0, 1.0))
        if not hi > lo:
            lo, hi = float(lo) - 0.5, float(hi) + 0.5
        img = ax.imshow(s[i], cmap="inferno", interpolation="nearest", vmin=lo, vmax=hi)
        fig.colorbar(img, cax=cax, label=f"{score_label} (1st-99.5th pct, clipped)", extend="both")
        handles = []
        if targets is not None and t[i].any():
            ax.contour(t[i].astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.9)
            gt = f"ground truth ({int(t[i].sum())} px)"
            handles.append(Line2D([], [], color="cyan", label=gt))
        if d is not None and d[i].any():
            ax.contour(d[i].astype(np.float32), levels=[0.5], colors="magenta", linewidths=0.7,
                       linestyles="dashed")
            handles.append(Line2D([], [], color="magenta", linestyle="dashed",
                                  label=f"model decisions ({int(d[i].sum())} px)"))
        elif d is not None:
            handles.append(Line2D([], [], color="magenta", linestyle="dashed",
                                  label="model decisions (none)"))
        if handles:
            fig.legend(handles=handles, loc="lower left", fontsize=7, frameon=False, ncol=2)
        title = f"frame {fid}" + (f" — {title_suffix}" if title_suffix else "")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
        paths[f"anomaly_map:{fid}"] = _save(fig, out_dir / f"anomaly_map_{name}.png")
    return paths


def write_evaluation_plots(
    scores: np.ndarray,
    targets: np.ndarray,
    frame_ids: Sequence[Any],
    out_dir: Path,
    *,
    threshold: float | None = None,
    score_label: str = "anomaly score",
) -> dict[str, Path]:
    """Write ROC, PR, score-histogram and per-frame anomaly-map PNGs (no MLflow).

    Curves and histograms pool the pixels of all frames; anomaly maps are per frame. Curves
    are drawn through at most 2000 of their points (the AUROC/AP in the legends use all).

    Args:
        scores: (N, H, W) anomaly scores.
        targets: (N, H, W) boolean ground truth (True = anomaly).
        frame_ids: One id per frame.
        out_dir: Output directory (created).
        threshold: Decision threshold in the unit of ``scores``: the maps draw the decisions.
        score_label: The unit of ``scores`` (colour bar of the maps).

    Returns:
        ``{"roc_curve": ..., "pr_curve": ..., "score_histogram": ...,
        "anomaly_map:<frame_id>": ...}`` paths.
    """
    s, t = _check_eval_inputs(scores, targets, frame_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_pos, n_neg = int(t.sum()), int(t.size - t.sum())
    paths: dict[str, Path] = {}
    frame = (0.15, 0.12, 0.8, 0.8)  # axes box: room for tick labels, axis labels, title

    curve = _curve(s, t)
    fpr, tpr = (v.numpy() for v in curve.roc())
    auc = curve.auroc()
    fig = _figure(4.5, 4.5)
    ax = fig.add_axes(frame)
    if math.isnan(auc):
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    else:
        ax.plot(*_thin_curve(fpr, tpr), lw=1.5, label=f"AUROC = {auc:.4f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"ROC, {s.shape[0]} frames, {n_pos} anomaly / {n_neg} normal px", fontsize=9)
    paths["roc_curve"] = _save(fig, out_dir / "roc_curve.png")

    precision, recall = (v.numpy() for v in curve.precision_recall())
    ap = curve.average_precision()
    fig = _figure(4.5, 4.5)
    ax = fig.add_axes(frame)
    if math.isnan(ap):
        ax.text(0.5, 0.5, "undefined: no anomaly pixels", ha="center", va="center")
    else:
        ax.step(*_thin_curve(recall, precision), where="post", lw=1.5, label=f"AP = {ap:.4f}")
        ax.axhline(n_pos / t.size, ls="--", c="grey", lw=0.8, label="chance")
        ax.legend(loc="upper right")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("Precision-recall", fontsize=9)
    paths["pr_curve"] = _save(fig, out_dir / "pr_curve.png")

    fig = _figure(5.5, 4)
    ax = fig.add_axes((0.13, 0.13, 0.82, 0.78))
    lo, hi = float(s.min()), float(s.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
    # One filled step artist per class (not 60 bar patches each).
    density, _ = np.histogram(s[~t], bins=bins, density=True)
    ax.stairs(density, bins, fill=True, alpha=0.6, label=f"normal ({n_neg} px)")
    if n_pos:
        density, _ = np.histogram(s[t], bins=bins, density=True)
        ax.stairs(density, bins, fill=True, alpha=0.6, label=f"anomaly ({n_pos} px)")
    ax.set_yscale("log")
    ax.set(xlabel="anomaly score", ylabel="density (log)")
    ax.legend()
    ax.set_title("Score distribution by ground truth", fontsize=9)
    paths["score_histogram"] = _save(fig, out_dir / "score_histogram.png")

    decisions = None if threshold is None else s > threshold
    suffix = "" if threshold is None else f"decisions: {score_label} > {threshold:.3g}"
    paths.update(
        write_anomaly_maps(
            s, frame_ids, out_dir / "anomaly_maps", targets=t, decisions=decisions,
            score_label=score_label, title_suffix=suffix,
        )
    )
    return paths


def log_evaluation(
    scores: np.ndarray,
    targets: np.ndarray,
    frame_ids: Sequence[Any],
    out_dir: Path,
    *,
    run_id: str | None = None,
    artifact_path: str = "evaluation",
    threshold: float | None = None,
    score_label: str = "anomaly score",
) -> dict[str, Path]:
    """Write the evaluation plots (:func:`write_evaluation_plots`) and log them to the run.

    Args:
        scores: (N, H, W) anomaly scores of the test frames.
        targets: (N, H, W) boolean ground truth.
        frame_ids: One id per frame.
        out_dir: Local directory for the PNGs.
        run_id: Run to log into; None logs into the active run.
        artifact_path: Artifact directory inside the run (anomaly maps go one level below).
        threshold: Decision threshold in the unit of ``scores`` (drawn on the maps).
        score_label: The unit of ``scores``.

    Returns:
        The local paths written, keyed as in :func:`write_evaluation_plots`.

    Raises:
        DataValidationError: Shapes disagree or scores are not finite (nothing is written).
        TrackingUnavailableError: No run given and none active.
    """
    import mlflow

    target_run = _resolve_run_id(run_id)
    paths = write_evaluation_plots(
        scores, targets, frame_ids, out_dir, threshold=threshold, score_label=score_label
    )
    client = mlflow.MlflowClient()
    for key, path in paths.items():
        sub = f"{artifact_path}/anomaly_maps" if key.startswith("anomaly_map:") else artifact_path
        client.log_artifact(target_run, str(path), artifact_path=sub)
    return paths
