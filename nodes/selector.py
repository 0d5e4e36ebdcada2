"""Soft (differentiable) channel selection.

Each of the ``n_select`` output channels is a softmax-weighted mix of the input bands; a low
temperature makes every row nearly one-hot, i.e. a band pick, while gradients can still move it
to a better band in Phase 2. The map is linear per pixel, so moments flow through it exactly.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from nodes.base import Node
from nodes.ports import PortSpec
from nodes.registry import register_node
from nodes.stats import MomentState

#: Softmax weight given to the picked band at initialization.
_PICK_WEIGHT = 0.98


@register_node
class SoftChannelSelector(Node):
    """Select ``n_select`` of ``input_channels`` bands through a trainable soft assignment.

    Args:
        n_select: Number of output channels.
        input_channels: Number of input bands C.
        init_method: ``"variance"`` picks the bands of highest variance in Phase 1;
            ``"uniform"`` picks evenly spaced bands at construction (no fit needed).
        temperature_init: Softmax temperature.
        name: Node name.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "data": PortSpec("float", ("B", "H", "W", "input_channels"), "input cube"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "selected": PortSpec("float", ("B", "H", "W", "n_select"), "selected channels"),
        "weights": PortSpec("float", ("n_select", "input_channels"), "soft selection weights"),
    }
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ("channel_logits",)
    DEFAULT_NAME: ClassVar[str | None] = "selector"
    MAIN_INPUT: ClassVar[str | None] = "data"
    AFFINE: ClassVar[bool] = True
    MAIN_OUTPUT: ClassVar[str | None] = "selected"
    channel_logits: Tensor
    temperature: Tensor

    def __init__(
        self,
        n_select: int,
        input_channels: int,
        init_method: Literal["variance", "uniform"] = "variance",
        temperature_init: float = 5.0,
        name: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name=name, **kwargs)  # type: ignore[arg-type]
        if not 0 < n_select <= input_channels:
            raise ValueError(f"n_select must be in 1..{input_channels}, got {n_select}")
        if init_method not in ("variance", "uniform"):
            raise ValueError(f"init_method must be 'variance' or 'uniform', got {init_method!r}")
        self.n_select = int(n_select)
        self.input_channels = int(input_channels)
        self.init_method = init_method
        self._remember(n_select=self.n_select, input_channels=self.input_channels,
                       init_method=init_method, temperature_init=float(temperature_init))
        self.register_buffer("temperature", torch.tensor(float(temperature_init)))
        self.register_buffer(
            "channel_logits", torch.full((self.n_select, self.input_channels), float("nan"))
        )
        self._init_fit_flag()
        if init_method == "uniform":
            picks = torch.linspace(0, self.input_channels - 1, self.n_select).round().long()
            self._set_picks(picks)

    @property
    def requires_initial_fit(self) -> bool:  # noqa: D102
        return self.init_method == "variance"

    def _set_picks(self, picks: Tensor) -> None:
        c = self.input_channels
        # Logit that gives the picked band _PICK_WEIGHT of the softmax mass at temperature T.
        peak = float(self.temperature) * math.log(_PICK_WEIGHT * max(c - 1, 1) / (1 - _PICK_WEIGHT))
        logits = torch.zeros(self.n_select, c, device=self.channel_logits.device)
        logits[torch.arange(self.n_select), picks.to(logits.device)] = peak
        self.channel_logits = logits
        self._mark_fitted()

    @property
    def selected_channels(self) -> Tensor:
        """Index of the dominant band of each output channel (n_select,)."""
        return self.channel_logits.detach().argmax(dim=1)

    def fit_from_moments(self, moments: MomentState) -> None:
        """Pick the ``n_select`` bands of highest variance (in band order)."""
        var = moments.var(ddof=1)
        picks = torch.topk(var, self.n_select).indices.sort().values
        self._set_picks(picks)

    def selection_matrix(self) -> Tensor:
        """Softmax selection matrix (n_select, C)."""
        return torch.softmax(self.channel_logits / self.temperature, dim=-1)

    def affine_map(self) -> tuple[Tensor, Tensor | None, bool] | None:  # noqa: D102
        if not self.is_initialized:
            return None
        return self.selection_matrix().detach().double(), None, False

    def forward(self, data: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Mix ``data`` (B, H, W, C) into (B, H, W, n_select)."""
        self.check_initialized()
        w = self.selection_matrix()
        return {"selected": data @ w.T.to(data.dtype), "weights": w}
