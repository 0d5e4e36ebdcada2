"""Data drift between two sets of Phase-1 moments, computed from the statistics alone.

The reference is the raw-band :class:`~nodes.training.stats.MomentState` stored in a champion's
initialization state; the candidate is one streaming pass over new frames. No second copy of the
reference data is needed: mean, covariance and per-band variances are enough for the three
criteria below.

1. **Mean shift** -- the Mahalanobis distance of the new mean from the reference mean in the
   reference's (regularized) covariance metric, ``sqrt(d^T S_ref^-1 d)`` with a Cholesky solve
   (Mahalanobis 1936). It catches coherent small shifts over many correlated bands -- an
   illumination change -- that no single band would flag.
2. **Covariance divergence** -- the root-mean-square log generalized eigenvalue of
   ``(S_new, S_ref)``: Förstner & Moonen's (1999) affine-invariant metric for covariance matrices
   divided by ``sqrt(C)``, so it reads as a typical log-factor of variance change per direction.
3. **Per-band distance** -- per band, the standardized mean difference (Cohen's d with the
   pooled standard deviation) and the log variance ratio; a band drifts when either exceeds its
   threshold, and the criterion fires when a given fraction of the bands drift.

Hyperspectral covariances are nearly singular (a handful of principal components carry almost all
of the variance), so both covariances get the same ridge, ``ridge * mean band variance`` of the
reference: directions with less variance than that are treated as sensor noise and not compared.
Without it, white noise of 5 % of a band's standard deviation alone reads as a large covariance
change on the bundled scenes.

Frames with another band count are bad input, not drift: :class:`DataValidationError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nodes.errors import DataValidationError
from nodes.training.stats import MomentState

_F64 = torch.float64


@dataclass(frozen=True)
class DriftThresholds:
    """Decision thresholds of :func:`compare_moments` (``params.yaml`` section ``drift``).

    The defaults were chosen on the bundled Los Angeles scenes: each training frame alone
    against the pooled training frames stays below every threshold (see
    tests/nodes/training/test_drift.py).

    Attributes:
        ridge: Covariance regularization, relative to the reference's mean band variance.
        mean_shift: Mahalanobis distance of the means above which the mean criterion fires.
        cov_divergence: RMS log generalized eigenvalue above which the covariance criterion fires.
        band_smd: Absolute standardized mean difference above which a band drifts.
        band_log_var_ratio: Absolute log variance ratio above which a band drifts (ln 2: the
            variance doubled or halved).
        band_fraction: Fraction of drifted bands at which the per-band criterion fires.
        min_criteria: Number of criteria that must fire to call it drift.
    """

    ridge: float = 1e-2
    mean_shift: float = 1.5
    cov_divergence: float = 0.3
    band_smd: float = 1.0
    band_log_var_ratio: float = math.log(2.0)
    band_fraction: float = 0.1
    min_criteria: int = 1

    def __post_init__(self) -> None:
        for name in ("ridge", "mean_shift", "cov_divergence", "band_smd", "band_log_var_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"drift threshold {name} must be a finite number > 0, got {value}")
        if not 0.0 < self.band_fraction <= 1.0:
            raise ValueError(
                f"drift threshold band_fraction must be in (0, 1], got {self.band_fraction}"
            )
        if not 1 <= self.min_criteria <= 3:
            raise ValueError(f"drift min_criteria must be 1, 2 or 3, got {self.min_criteria}")


@dataclass(frozen=True)
class Criterion:
    """One drift criterion: its value, its threshold and whether it fired."""

    name: str
    value: float
    threshold: float
    fired: bool


@dataclass(frozen=True)
class DriftReport:
    """The outcome of :func:`compare_moments`.

    Attributes:
        drifted: The decision.
        reason: One human-readable sentence explaining it.
        criteria: The three criteria, in a fixed order (mean_shift, cov_divergence, bands).
        drifted_bands: Indices of the bands over a per-band threshold.
        band_smd: Per-band standardized mean difference (new - reference), length C.
        band_log_var_ratio: Per-band ``log(var_new / var_ref)``, length C.
        n_reference: Pixel count of the reference statistics.
        n_new: Pixel count of the new statistics.
        thresholds: The thresholds used.
    """

    drifted: bool
    reason: str
    criteria: tuple[Criterion, ...]
    drifted_bands: tuple[int, ...]
    band_smd: tuple[float, ...]
    band_log_var_ratio: tuple[float, ...]
    n_reference: int
    n_new: int
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    @property
    def fired(self) -> tuple[str, ...]:
        """Names of the criteria that fired."""
        return tuple(c.name for c in self.criteria if c.fired)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the MLflow artifact and the Prefect event payload)."""
        return asdict(self) | {"fired": list(self.fired)}

    def summary(self) -> dict[str, Any]:
        """A small dict without the per-band arrays (for event payloads and logs)."""
        return {
            "drifted": self.drifted,
            "reason": self.reason,
            "fired": list(self.fired),
            "drifted_bands": list(self.drifted_bands),
            **{c.name: round(c.value, 6) for c in self.criteria},
        }


def compare_moments(
    reference: MomentState,
    new: MomentState,
    thresholds: DriftThresholds | None = None,
) -> DriftReport:
    """Decide whether ``new`` has drifted away from ``reference``.

    Args:
        reference: Raw-band moments of the data the model was initialized on.
        new: Raw-band moments of the new data (same bands).
        thresholds: Decision thresholds; defaults to :class:`DriftThresholds`.

    Returns:
        The decision with every criterion's value, the drifted bands and a reason.

    Raises:
        DataValidationError: Band counts differ, fewer than two pixels, or non-finite moments.
    """
    th = thresholds or DriftThresholds()
    _check_comparable(reference, new)
    c = reference.num_channels
    cov_ref = reference.cov(ddof=1).to(_F64)
    cov_new = new.cov(ddof=1).to(new.mean.device).to(_F64)
    ridge = th.ridge * float(torch.diagonal(cov_ref).mean())
    if not ridge > 0:
        raise DataValidationError(
            "drift check: the reference statistics have zero variance in every band; the "
            "champion's initialization state is degenerate -- re-initialize with `cubeline train`"
        )
    eye = torch.eye(c, dtype=_F64)
    chol = torch.linalg.cholesky(cov_ref + ridge * eye)

    delta = (new.mean.to(_F64) - reference.mean.to(_F64)).unsqueeze(1)
    white = torch.linalg.solve_triangular(chol, delta, upper=False)
    mean_shift = float(torch.linalg.vector_norm(white))

    # Generalized eigenvalues of (S_new, S_ref) are the eigenvalues of L^-1 S_new L^-T.
    half = torch.linalg.solve_triangular(chol, cov_new + ridge * eye, upper=False)
    sym = torch.linalg.solve_triangular(chol, half.T, upper=False)
    eig = torch.linalg.eigvalsh((sym + sym.T) * 0.5).clamp_min(torch.finfo(_F64).tiny)
    cov_div = float(torch.sqrt(torch.mean(torch.log(eig) ** 2)))

    var_ref = torch.diagonal(cov_ref) + ridge
    var_new = torch.diagonal(cov_new) + ridge
    smd = (new.mean.to(_F64) - reference.mean.to(_F64)) / torch.sqrt((var_ref + var_new) * 0.5)
    lvr = torch.log(var_new / var_ref)
    band_mask = (smd.abs() > th.band_smd) | (lvr.abs() > th.band_log_var_ratio)
    drifted_bands = tuple(int(i) for i in torch.nonzero(band_mask).flatten())
    band_frac = len(drifted_bands) / c

    criteria = (
        Criterion("mean_shift", mean_shift, th.mean_shift, mean_shift > th.mean_shift),
        Criterion("cov_divergence", cov_div, th.cov_divergence, cov_div > th.cov_divergence),
        Criterion("band_fraction", band_frac, th.band_fraction, band_frac >= th.band_fraction),
    )
    n_fired = sum(cr.fired for cr in criteria)
    drifted = n_fired >= th.min_criteria
    return DriftReport(
        drifted=drifted,
        reason=_reason(criteria, drifted, th.min_criteria, drifted_bands, c),
        criteria=criteria,
        drifted_bands=drifted_bands,
        band_smd=tuple(float(v) for v in smd),
        band_log_var_ratio=tuple(float(v) for v in lvr),
        n_reference=reference.count,
        n_new=new.count,
        thresholds=th,
    )


def _check_comparable(reference: MomentState, new: MomentState) -> None:
    if new.num_channels != reference.num_channels:
        raise DataValidationError(
            f"drift check: the new frames have {new.num_channels} bands but the reference "
            f"statistics (the champion's initialization state) have {reference.num_channels}. "
            "Frames of another band count come from another sensor or band selection and "
            "cannot be compared: select the same bands, or train a new model on them with "
            "`cubeline train`."
        )
    for label, st in (("reference", reference), ("new", new)):
        if st.count < 2:
            raise DataValidationError(
                f"drift check: the {label} statistics hold {st.count} pixel(s); at least 2 are "
                "needed for a covariance -- pass frames with pixels"
            )
        if not (bool(torch.isfinite(st.mean).all()) and bool(torch.isfinite(st.m2).all())):
            raise DataValidationError(
                f"drift check: the {label} statistics contain NaN or inf; the frames they come "
                "from hold non-finite values -- fix or drop those frames"
            )


def _reason(
    criteria: tuple[Criterion, ...],
    drifted: bool,
    min_criteria: int,
    drifted_bands: tuple[int, ...],
    num_channels: int,
) -> str:
    parts = [
        f"{c.name} {c.value:.3g} {'>' if c.fired else '<='} {c.threshold:.3g}" for c in criteria
    ]
    fired = [c.name for c in criteria if c.fired]
    verdict = "drift" if drifted else "no drift"
    why = (
        f"{len(fired)} of 3 criteria fired ({', '.join(fired)}), {min_criteria} needed"
        if fired
        else "no criterion fired"
    )
    bands = f"{len(drifted_bands)}/{num_channels} bands over a per-band threshold"
    if drifted_bands:
        shown = ", ".join(str(b) for b in drifted_bands[:10])
        bands += f" ({shown}{', ...' if len(drifted_bands) > 10 else ''})"
    return f"{verdict}: {why}; {'; '.join(parts)}; {bands}"


def plot_drift_report(report: DriftReport, path: Path | str, *, title: str = "") -> Path:
    """Write a per-band plot of ``report`` as PNG (Agg canvas: no display, no global backend).

    Top: standardized mean difference per band; bottom: log variance ratio; thresholds dashed,
    drifted bands marked.

    Args:
        report: A result of :func:`compare_moments`.
        path: Output file (.png); parent directories are created.
        title: Prefix for the figure title.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    bands = list(range(len(report.band_smd)))
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_m, ax_v = fig.subplots(2, 1, sharex=True)
    th = report.thresholds
    for ax, values, limit, label in (
        (ax_m, report.band_smd, th.band_smd, "standardized mean diff."),
        (ax_v, report.band_log_var_ratio, th.band_log_var_ratio, "log variance ratio"),
    ):
        ax.plot(bands, values, lw=1.2, color="tab:blue")
        for sign in (1, -1):
            ax.axhline(sign * limit, ls="--", lw=0.8, color="tab:red")
        marked = [b for b in report.drifted_bands if abs(values[b]) > limit]
        ax.scatter(marked, [values[b] for b in marked], s=10, color="tab:red", zorder=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_v.set_xlabel("band index")
    verdict = "DRIFT" if report.drifted else "no drift"
    fired = ", ".join(report.fired) or "none"
    fig.suptitle(f"{title + ': ' if title else ''}{verdict} (criteria fired: {fired})")
    fig.savefig(out, dpi=100)
    return out
