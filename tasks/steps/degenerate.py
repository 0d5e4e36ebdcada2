"""Statistics that cannot give a detector are refused before Phase 1 fits -- or repaired, stated.

RX whitens the pixels with the inverse of their covariance. A band of constant value, a band that
copies another, or fewer pixels than bands make that covariance singular: the fit "succeeds" on
the tiny ``pipeline.eps`` alone, the scores blow up and the calibrated threshold becomes infinite
(every pixel flagged). ``phase1.degenerate: refuse`` (default) stops the run with the bands
named; ``ridge`` adds ``phase1.ridge`` x the mean band variance to the covariance's diagonal (the
pipeline's ``eps``), recorded in the run (param ``phase1/ridge_eps``) and the state.
"""

from __future__ import annotations

import math
from typing import Any

from nodes.errors import DegenerateStatisticsError

#: A band whose variance is below this fraction of the mean band variance counts as constant.
ZERO_VARIANCE_RTOL = 1e-12
#: A correlation matrix whose smallest/largest eigenvalue ratio is below this is singular.
SINGULAR_RCOND = 1e-12


def _bands(idx: list[int]) -> str:
    shown = ", ".join(str(i) for i in idx[:8])
    return f"{shown}{', ...' if len(idx) > 8 else ''}"


def degenerate_problems(moments: Any) -> tuple[list[str], float, bool]:
    """What makes these moments unusable for RX.

    Args:
        moments: A :class:`nodes.training.stats.MomentState` of the training pixels.

    Returns:
        ``(problems, mean band variance, repairable)``: an empty list when the statistics are
        usable; ``repairable`` is False for non-finite statistics (no ridge fixes those).
    """
    import torch

    if moments.count < 2:
        return [f"only {moments.count} training pixel(s)"], 0.0, False
    mean, cov = moments.mean.double(), moments.cov(ddof=1).double()
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(cov).all())):
        bad = torch.nonzero(~torch.isfinite(mean)).flatten().tolist()
        return [f"non-finite pixel values (bands {_bands(bad) or 'in the covariance'})"], 0.0, False
    var = torch.diagonal(cov)
    scale = float(var.mean())
    floor = ZERO_VARIANCE_RTOL * max(scale, 0.0)
    zero = torch.nonzero(var <= floor).flatten().tolist()
    problems: list[str] = []
    if zero:
        problems.append(f"{len(zero)} zero-variance band(s) ({_bands(zero)})")
    else:
        d = torch.rsqrt(var)
        eig = torch.linalg.eigvalsh(cov * d[:, None] * d[None, :])
        rcond = float(eig[0] / eig[-1]) if float(eig[-1]) > 0 else 0.0
        if not rcond > SINGULAR_RCOND:
            rank = int((eig > SINGULAR_RCOND * eig[-1]).sum())
            problems.append(
                f"a singular covariance (rank {rank} of {var.numel()} bands: some bands are "
                "linear combinations of others, or there are too few pixels)"
            )
    return problems, scale, True


def check_statistics(moments: Any, *, frames: str, policy: str, ridge: float, eps: float
                     ) -> float | None:
    """Refuse (or repair) degenerate training statistics.

    Args:
        moments: Raw-band moments of the training pixels.
        frames: The training frames, for the message.
        policy: ``phase1.degenerate``: ``refuse`` or ``ridge``.
        ridge: ``phase1.ridge``, relative to the mean band variance.
        eps: The pipeline's ``eps`` now.

    Returns:
        None when the statistics are fine; else the ``eps`` to fit with (``ridge`` policy).

    Raises:
        DegenerateStatisticsError: Degenerate statistics and ``policy`` is ``refuse``, or they are
            not finite (no ridge repairs that).
    """
    problems, scale, repairable = degenerate_problems(moments)
    if not problems:
        return None
    what = "; ".join(problems)
    if policy != "ridge" or not repairable:
        fix = (
            "set phase1.degenerate: ridge (adds phase1.ridge x the mean band variance to the "
            "covariance diagonal) or drop such frames/bands"
            if repairable
            else "remove or repair the frames with NaN/inf values"
        )
        raise DegenerateStatisticsError(
            f"Phase 1 refused: the training frames {frames} give {what}; RX cannot whiten them "
            f"(its threshold would be infinite and flag every pixel). Fix: check the frames "
            f"(params.yaml data.train_ids), or {fix}"
        )
    added = ridge * (scale if scale > 0 and math.isfinite(scale) else 1.0)
    return max(eps, added)
