"""Min-max normalization with statistics fitted in Phase 1."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from nodes.graph.base import Node, unfitted
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node
from nodes.training.stats import MomentState

_CUBE = ("B", "H", "W", "C")


@register_node
class MinMaxNormalizer(Node):
    """Scale a cube to [0, 1] with the training data's min and max.

    With ``use_running_stats=True`` the min/max are fitted once in Phase 1 (global over all bands,
    or per band with ``per_channel=True``), which makes the node a fixed affine map; the next
    statistical node can then be fitted in the same data pass. With ``False`` every sample is
    scaled by its own min/max (no fit, not affine across samples).

    Args:
        eps: Added to the range to avoid division by zero.
        use_running_stats: Fit global statistics in Phase 1 instead of per-sample scaling.
        per_channel: One min/max per band instead of one for the whole cube.
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "data": PortSpec("float", _CUBE, "hyperspectral cube"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "normalized": PortSpec("float", _CUBE, "cube scaled to [0, 1]"),
    }
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ("running_min", "running_max")
    DEFAULT_NAME: ClassVar[str | None] = "normalizer"
    MAIN_INPUT: ClassVar[str | None] = "data"
    MAIN_OUTPUT: ClassVar[str | None] = "normalized"
    running_min: Tensor
    running_max: Tensor

    def __init__(
        self,
        eps: float = 1e-6,
        use_running_stats: bool = True,
        per_channel: bool = False,
        name: str | None = None,
        execution_stages: Iterable[str] | None = None,
    ) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        self.eps = float(eps)
        self.use_running_stats = bool(use_running_stats)
        self.per_channel = bool(per_channel)
        self._remember(eps=self.eps, use_running_stats=self.use_running_stats,
                       per_channel=self.per_channel)
        shape: tuple[int, ...] = (0,) if per_channel else ()
        self.declare_fitted(
            required=self.use_running_stats,
            running_min=unfitted(*shape),
            running_max=unfitted(*shape),
        )

    @property
    def fit_needs_minmax(self) -> bool:  # noqa: D102
        return True

    def fit_from_moments(self, moments: MomentState) -> None:
        """Take min/max of the input from its moments (exact, carried through scalings)."""
        if not moments.has_minmax:
            raise ValueError(f"node {self.name!r} needs exact min/max of its input")
        lo, hi = moments.min, moments.max
        if not self.per_channel:
            lo, hi = lo.min(), hi.max()
        dev = self.running_min.device
        self.running_min = lo.to(device=dev, dtype=torch.float32).clone()
        self.running_max = hi.to(device=dev, dtype=torch.float32).clone()
        self._mark_fitted()

    def _scale_offset(self) -> tuple[Tensor, Tensor]:
        scale = 1.0 / (self.running_max - self.running_min + self.eps)
        return scale, -self.running_min * scale

    @property
    def is_affine(self) -> bool:  # noqa: D102
        return self.use_running_stats

    @property
    def affine_keeps_minmax(self) -> bool:  # noqa: D102
        return True

    def affine_map(self) -> tuple[Tensor, Tensor | None, bool] | None:  # noqa: D102
        if not self.use_running_stats or not self.is_initialized:
            return None
        scale, offset = self._scale_offset()
        return scale.detach().double(), offset.detach().double(), True

    def forward(self, data: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Scale ``data`` (B, H, W, C)."""
        if self.use_running_stats:
            self.check_initialized()
            scale, offset = self._scale_offset()
            return {"normalized": data * scale.to(data.dtype) + offset.to(data.dtype)}
        flat = data.flatten(1)
        lo = flat.amin(dim=1).view(-1, 1, 1, 1)
        hi = flat.amax(dim=1).view(-1, 1, 1, 1)
        return {"normalized": (data - lo) / (hi - lo + self.eps)}
