"""Loss nodes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from nodes.graph.base import Node
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node

_MAP = ("B", "H", "W")


@register_node
class AnomalyBCEWithLogits(Node):
    """Pixel-wise binary cross-entropy on anomaly logits, times ``weight``.

    Args:
        name: Node name; the loss is logged as ``train/<name>`` and ``val/<name>``.
        weight: Multiplier of this loss in the sum over loss nodes.
        pos_weight: Optional weight of the anomaly class (anomalies are rare).
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "predictions": PortSpec("float", _MAP, "anomaly logits"),
        "targets": PortSpec("bool", _MAP, "ground-truth anomaly mask"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "loss": PortSpec("float", (), "weighted scalar loss"),
    }
    DEFAULT_STAGES: ClassVar[frozenset[str]] = frozenset({"train", "val", "test"})
    DEFAULT_NAME: ClassVar[str | None] = "bce"

    def __init__(self, name: str | None = None, weight: float = 1.0,
                 pos_weight: float | None = None,
                 execution_stages: Iterable[str] | None = None) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        self.weight = float(weight)
        self._remember(weight=self.weight, pos_weight=pos_weight)
        self.pos_weight = None if pos_weight is None else float(pos_weight)

    def forward(self, predictions: Tensor, targets: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Mean BCE over pixels, times ``weight``."""
        pw = None
        if self.pos_weight is not None:
            pw = torch.tensor(self.pos_weight, device=predictions.device, dtype=predictions.dtype)
        loss = F.binary_cross_entropy_with_logits(
            predictions, targets.to(predictions.dtype), pos_weight=pw
        )
        return {"loss": loss * self.weight}
