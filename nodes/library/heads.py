"""Score-to-logit head and binary decision node."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from nodes.graph.base import Node
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node
from nodes.training.stats import MomentState

_MAP = ("B", "H", "W")


@register_node
class ScoreToLogit(Node):
    """Affine map from anomaly scores to logits: ``scale * (scores - center) + bias``.

    With ``standardize=True`` (default) Phase 1 sets ``center`` to the mean training score and
    ``scale`` to ``init_scale / std``, so logits start as z-scores whatever the detector's units
    (raw RX scores are in the tens or hundreds and would saturate the sigmoid). With
    ``standardize=False`` it is the fixed map ``init_scale * scores + init_bias``.

    Args:
        init_scale: Initial scale (per standard deviation when standardizing).
        init_bias: Initial bias.
        standardize: Fit ``center`` and the scale from the training scores in Phase 1.
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "scores": PortSpec("float", _MAP, "anomaly scores"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "logits": PortSpec("float", _MAP, "anomaly logits"),
    }
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ("scale", "bias")
    DEFAULT_NAME: ClassVar[str | None] = "logit_head"
    MAIN_INPUT: ClassVar[str | None] = "scores"
    MAIN_OUTPUT: ClassVar[str | None] = "logits"

    def __init__(self, init_scale: float = 1.0, init_bias: float = 0.0, standardize: bool = True,
                 name: str | None = None, execution_stages: Iterable[str] | None = None) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        self.init_scale = float(init_scale)
        self.init_bias = float(init_bias)
        self.standardize = bool(standardize)
        self._remember(init_scale=self.init_scale, init_bias=self.init_bias,
                       standardize=self.standardize)
        self.declare_fitted(
            required=self.standardize,
            scale=torch.tensor(self.init_scale),
            bias=torch.tensor(self.init_bias),
            center=torch.tensor(0.0),
        )

    @property
    def is_affine(self) -> bool:  # noqa: D102
        return True

    @property
    def affine_keeps_minmax(self) -> bool:  # noqa: D102
        return True

    def fit_from_moments(self, moments: MomentState) -> None:
        """Centre on the mean score and scale by its standard deviation."""
        std = float(moments.var(ddof=1)[0].clamp_min(1e-12).sqrt())
        self.center.fill_(float(moments.mean[0]))
        self.scale.fill_(self.init_scale / std)
        self.bias.fill_(self.init_bias)
        self._mark_fitted()

    def affine_map(self) -> tuple[Tensor, Tensor | None, bool] | None:  # noqa: D102
        if not self.is_initialized:
            return None
        s = self.scale.detach().double().reshape(1)
        return s, (self.bias.detach().double() - s * self.center.double()).reshape(1), True

    def forward(self, scores: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Map scores (B, H, W) to logits."""
        self.check_initialized()
        return {"logits": self.scale * (scores - self.center) + self.bias}


@register_node
class BinaryDecider(Node):
    """Threshold probabilities: ``sigmoid(logits) >= threshold``.

    The threshold is a buffer so a threshold calibrated on validation data is saved with the
    model (:meth:`set_threshold`).

    Args:
        threshold: Probability threshold in (0, 1).
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "logits": PortSpec("float", _MAP, "anomaly logits"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "decisions": PortSpec("bool", _MAP, "anomaly decisions"),
    }
    DEFAULT_NAME: ClassVar[str | None] = "decider"

    def __init__(self, threshold: float = 0.5, name: str | None = None,
                 execution_stages: Iterable[str] | None = None) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
        self._remember(threshold=float(threshold))
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))

    @property
    def logit_threshold(self) -> float:
        """The threshold in logit units (+inf for a probability that rounded to 1)."""
        p = float(self.threshold)
        if p >= 1.0:  # a calibrated logit above ~36.7 rounds to 1 in float64: flag nothing
            return math.inf
        if p <= 0.0:
            return -math.inf
        return math.log(p) - math.log1p(-p)

    def set_threshold(self, probability: float) -> None:
        """Store a new (e.g. calibrated) probability threshold."""
        if not 0.0 < probability < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {probability}")
        self.threshold.fill_(probability)

    def set_logit_threshold(self, logit: float) -> None:
        """Store a threshold given in logit units (kept exact in float64)."""
        self.threshold.fill_(1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0)

    def forward(self, logits: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Decide anomaly per pixel."""
        # Compare in logit space: sigmoid saturates in float32 long before logits do.
        return {"decisions": logits >= self.logit_threshold}
