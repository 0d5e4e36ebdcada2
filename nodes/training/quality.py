"""Initialization quality of RX nodes: is the fitted background model sound?

The reference guide tests an RX initialization by the mean score on validation data and calls
anything above 1 poor. That is wrong for RX: the score is a squared Mahalanobis distance, whose
mean over the pixels the statistics were fitted on is ``(n - 1) / n * C`` for C channels with no
ridge (the trace of ``Sigma^{-1} S``), so a perfect fit scores about C, not at most 1.

The correct checks compare the mean score with C:

- **fit ratio**, ``mean d^2 / C`` over the fit pixels, in closed form from the fitted moments
  (``trace((Sigma + eps I)^{-1} M2) / (n C)``, no data pass): 1 for a plain fit; below 1 by
  the share of the variance that the ridge ``eps`` drowns (``sum lambda / (lambda + eps) / C``).
  A low ratio says ``eps`` is large against the covariance's eigenvalues (the input's scale).
- **held-out ratio**, ``mean d^2 / C`` over the *normal* pixels of another split: near the fit
  ratio when that background looks like the fit data, far above it when it does not
  (another scene, drift, or statistics fitted on too few or contaminated pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nodes.errors import CubelineError
from nodes.library.rx import RXGlobal
from nodes.training.stats import MomentState

#: Defaults of :func:`assess`: a fit ratio below this means the ridge drowns half the variance.
MIN_FIT_RATIO = 0.5
#: A held-out mean score above this many times C means the background does not match.
MAX_HELD_OUT_RATIO = 3.0


class InitializationQualityError(CubelineError):
    """A Phase-1 initialization failed its quality check (see :class:`InitQuality`)."""


@dataclass
class InitQuality:
    """Quality figures of one fitted RX node.

    Attributes:
        node: Node name.
        channels: Input channels C.
        fit_ratio: Mean squared Mahalanobis distance over the fit pixels, divided by C.
        held_out_ratio: The same over the normal pixels of ``held_out_split``, when checked.
        held_out_split: Which split gave ``held_out_ratio``.
        ok: No reason below.
        reasons: What is wrong, each with the fix.
    """

    node: str
    channels: int
    fit_ratio: float
    held_out_ratio: float | None = None
    held_out_split: str | None = None
    ok: bool = True
    reasons: list[str] = field(default_factory=list)

    def to_metrics(self, prefix: str = "init_quality") -> dict[str, float]:
        """Flat metrics (MLflow-friendly): fit ratio, held-out ratio, ok as 0/1."""
        out = {f"{prefix}/{self.node}/fit_ratio": self.fit_ratio,
               f"{prefix}/{self.node}/ok": float(self.ok)}
        if self.held_out_ratio is not None:
            out[f"{prefix}/{self.node}/{self.held_out_split}_ratio"] = self.held_out_ratio
        return out


def fit_ratio(rx: RXGlobal, moments: MomentState) -> float:
    """``mean d^2 / C`` over the pixels whose ``moments`` the node was fitted on (closed form).

    Args:
        rx: A fitted RX node.
        moments: The float64 moments of its input over the fit pixels.

    Returns:
        ``trace(L^{-1} M2 L^{-T}) / (n C)`` with ``L L^T = Sigma + eps I``.
    """
    rx.check_initialized()
    with torch.no_grad():
        factor = rx._factor().to(moments.m2.device)
        w = torch.linalg.solve_triangular(
            factor, torch.eye(rx.num_channels, dtype=factor.dtype, device=factor.device),
            upper=False)
        trace = float(((w @ moments.m2) * w).sum())
    return trace / (moments.count * rx.num_channels)


def assess(node: str, channels: int, fit: float, held_out: float | None = None,
           split: str | None = None, *, eps: float | None = None,
           min_fit_ratio: float = MIN_FIT_RATIO,
           max_held_out_ratio: float = MAX_HELD_OUT_RATIO) -> InitQuality:
    """Judge the ratios of one RX node against the limits.

    Args:
        node: Node name.
        channels: C.
        fit: The fit ratio.
        held_out: The held-out ratio, if measured.
        split: The split ``held_out`` was measured on.
        eps: The node's ridge (named in the fix).
        min_fit_ratio: Lowest acceptable fit ratio.
        max_held_out_ratio: Highest acceptable held-out ratio.
    """
    reasons = []
    if not fit >= min_fit_ratio:  # also catches NaN
        reasons.append(
            f"fit ratio {fit:.3g} < {min_fit_ratio}: the ridge eps={eps} drowns "
            f"{(1 - fit) * 100:.0f}% of the variance of the {channels} input channels; lower "
            "RXGlobal eps or feed it larger-scale data"
        )
    if held_out is not None and not held_out <= max_held_out_ratio:
        reasons.append(
            f"{split} ratio {held_out:.3g} > {max_held_out_ratio}: the normal pixels of the "
            f"{split} split score {held_out:.3g} x C on average, so the fitted background does "
            "not describe them; fit on more representative frames (or re-initialize on the "
            "new data)"
        )
    return InitQuality(node=node, channels=channels, fit_ratio=fit, held_out_ratio=held_out,
                       held_out_split=split, ok=not reasons, reasons=reasons)
