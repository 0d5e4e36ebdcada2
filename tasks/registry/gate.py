"""The metric gate: a pure decision from the challenger's and champion's metrics.

:func:`decide_promotion` compares metrics on the *same* pinned evaluation split under a
:class:`GateConfig`: better by the margin -> promote; worse or equal -> stay challenger; no
champion -> the absolute thresholds alone (which always apply). No MLflow call happens here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from nodes.errors import ConfigError
from nodes.training.config import ConfigModel

if TYPE_CHECKING:
    pass



#: Key under which the calibrated decision threshold reaches the gate (not a gate metric).
THRESHOLD_METRIC = "decision_threshold_logit"


#: Relative tolerance when comparing an improvement with the margin: 0.83 - 0.82 is
#: 0.00999999... in binary floating point and must still count as a margin of 0.01.
_MARGIN_RTOL = 1e-9


class GateConfig(ConfigModel):
    """Promotion gate: which metric decides, in which direction, by what margin.

    Attributes:
        metric: Metric that decides, as logged by the evaluation (e.g. ``metrics_anomaly/ap``).
        mode: ``max`` if higher is better, ``min`` if lower is better.
        min_improvement: Margin the challenger must beat the champion by (in metric units,
            inclusive). Equal is never enough, even at 0.
        absolute_thresholds: Minimums (``metric >= value``) the challenger must meet. They
            always apply: alone for the first model, and on top of the margin afterwards.
        absolute_maximums: Maximums (``metric <= value``), for lower-is-better metrics such as
            a loss; always apply too.
    """

    metric: str = "metrics_anomaly/ap"
    mode: Literal["max", "min"] = "max"
    min_improvement: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    absolute_thresholds: dict[str, float] = Field(default_factory=dict)
    absolute_maximums: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "params.yaml") -> GateConfig:
        """Validate a params section into a gate, as a :class:`ConfigError` naming ``source``.

        Args:
            data: The section, e.g. ``params["register"]["gate"]``.
            source: Where it came from, for the error message.

        Returns:
            The gate.

        Raises:
            ConfigError: Unknown key, wrong type, negative margin.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: the promotion gate must be a mapping with the keys metric, mode "
                f"(max|min), min_improvement (>= 0), absolute_thresholds, absolute_maximums; "
                f"got {type(data).__name__}."
            )
        return cls.from_dict(dict(data), source=source)


GateLike = GateConfig | BaseModel | Mapping[str, Any]


def as_gate(gate: GateLike, source: str = "params.yaml:registry.gate") -> GateConfig:
    """Coerce a gate given as :class:`GateConfig`, another pydantic model or a mapping.

    Lets callers pass the typed ``params.yaml`` section as it is.

    Raises:
        ConfigError: The fields do not make a valid gate.
    """
    if isinstance(gate, GateConfig):
        return gate
    data = gate.model_dump() if isinstance(gate, BaseModel) else dict(gate)
    return GateConfig.from_mapping(data, source=source)


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`decide_promotion`.

    Attributes:
        promote: Move ``champion`` to the challenger.
        reason: One sentence saying why, with the numbers.
        metric: The deciding metric.
        challenger_value: Challenger's value of ``metric``.
        champion_value: Champion's value on the same split (None: no champion or not comparable).
        improvement: Signed improvement in the better direction (None when not compared).
        comparable: False when the champion's metrics are not on the challenger's split (or lack
            the metric): the champion must be re-evaluated before a comparison.
        failed_thresholds: Absolute thresholds the challenger missed, as readable strings.
    """

    promote: bool
    reason: str
    metric: str
    challenger_value: float
    champion_value: float | None = None
    improvement: float | None = None
    comparable: bool = True
    failed_thresholds: tuple[str, ...] = ()

    @property
    def needs_champion_reevaluation(self) -> bool:
        """The challenger passed its thresholds but the champion has no score on its split."""
        return not self.comparable and not self.failed_thresholds


def _metric(metrics: Mapping[str, float], name: str, who: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"Promotion gate: the {who} has no metric {name!r} (it has "
            f"{sorted(metrics)}). Fix: set the gate's metric/thresholds in params.yaml to a "
            "metric the evaluation logs."
        )
    return float(metrics[name])


def decide_promotion(
    challenger_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    gate: GateLike,
    *,
    challenger_split_id: str,
    champion_split_id: str | None = None,
) -> PromotionDecision:
    """Decide whether the challenger replaces the champion. Pure: no I/O.

    Rules, in order: the challenger must meet every absolute threshold (always); with no champion
    that is enough; otherwise both must have been evaluated on the same split (else not
    comparable: no promotion, re-evaluate the champion); then the challenger must be strictly
    better and better by at least ``gate.min_improvement``. A NaN never promotes.

    Args:
        challenger_metrics: Challenger's test metrics.
        champion_metrics: Champion's metrics on ``champion_split_id``; None if no champion.
        gate: The gate.
        challenger_split_id: Id of the evaluation split the challenger was scored on.
        champion_split_id: Id of the split the champion's metrics come from.

    Returns:
        The decision with its reason.

    Raises:
        ConfigError: The challenger lacks the gate metric or a thresholded metric.
    """
    gate = as_gate(gate)
    name = gate.metric
    value = _metric(challenger_metrics, name, "challenger")
    failed: list[str] = []
    for key, minimum in sorted(gate.absolute_thresholds.items()):
        got = _metric(challenger_metrics, key, "challenger")
        if not got >= minimum:  # NaN fails too
            failed.append(f"{key}={got:.6g} < minimum {minimum:.6g}")
    for key, maximum in sorted(gate.absolute_maximums.items()):
        got = _metric(challenger_metrics, key, "challenger")
        if not got <= maximum:
            failed.append(f"{key}={got:.6g} > maximum {maximum:.6g}")
    if math.isnan(value):
        failed.append(f"{name} is NaN")
    # Floors no params.yaml can lower: a detector no better than chance, or one whose decision
    # threshold is not a number, is never promoted.
    for key, got in sorted(challenger_metrics.items()):
        if key.rsplit("/", 1)[-1] == "auroc" and not float(got) > 0.5:
            failed.append(f"{key}={float(got):.6g} <= 0.5 (no better than chance; never promoted)")
    threshold = challenger_metrics.get(THRESHOLD_METRIC)
    if threshold is not None and not math.isfinite(float(threshold)):
        failed.append(f"decision threshold {threshold} is not finite (never promoted)")
    if failed:
        return PromotionDecision(
            promote=False,
            reason="challenger fails the absolute thresholds: " + "; ".join(failed),
            metric=name,
            challenger_value=value,
            failed_thresholds=tuple(failed),
        )
    if champion_metrics is None:
        return PromotionDecision(
            promote=True,
            reason=(
                f"no champion yet; challenger meets the absolute thresholds ({name}={value:.6g})"
            ),
            metric=name,
            challenger_value=value,
        )
    if champion_split_id != challenger_split_id:
        return PromotionDecision(
            promote=False,
            reason=(
                f"not comparable: champion scored on split {champion_split_id!r}, challenger on "
                f"{challenger_split_id!r}; re-evaluate the champion on the challenger's split"
            ),
            metric=name,
            challenger_value=value,
            comparable=False,
        )
    champ = float(champion_metrics[name]) if name in champion_metrics else math.nan
    if math.isnan(champ):
        return PromotionDecision(
            promote=False,
            reason=(
                f"not comparable: the champion has no finite {name!r} on split "
                f"{challenger_split_id!r}; re-evaluate the champion"
            ),
            metric=name,
            challenger_value=value,
            comparable=False,
        )
    improvement = value - champ if gate.mode == "max" else champ - value
    margin = gate.min_improvement
    better = improvement > 0 and improvement >= margin - _MARGIN_RTOL * max(1.0, abs(margin))
    direction = "higher" if gate.mode == "max" else "lower"
    if better:
        reason = (
            f"challenger beats champion on {name} ({direction} is better): {value:.6g} vs "
            f"{champ:.6g}, improvement {improvement:.6g} >= margin {margin:.6g}"
        )
    elif improvement == 0:
        reason = f"challenger equals champion on {name} ({value:.6g}); equal does not promote"
    elif improvement < 0:
        reason = (
            f"challenger is worse than champion on {name} ({direction} is better): "
            f"{value:.6g} vs {champ:.6g}"
        )
    else:
        reason = (
            f"challenger improves {name} by {improvement:.6g} ({value:.6g} vs {champ:.6g}), "
            f"below the margin {margin:.6g}"
        )
    return PromotionDecision(
        promote=better,
        reason=reason,
        metric=name,
        challenger_value=value,
        champion_value=champ,
        improvement=improvement,
    )


def split_id_of(frame_ids: list[str] | tuple[str, ...], data_hash: str) -> str:
    """Return the id of a pinned evaluation split: SHA-256 of its data hash and frame ids.

    Args:
        frame_ids: Test frame ids, in any order (they are sorted).
        data_hash: DVC content hash of the data the frames come from.

    Returns:
        16 hex digits (enough to tell splits apart; short enough for a tag key).
    """
    payload = json.dumps({"data": data_hash, "frames": sorted(map(str, frame_ids))})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
