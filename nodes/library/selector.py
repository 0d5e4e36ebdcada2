"""Soft (differentiable) channel selection, in the two readings of the reference guide.

``mode="hard"`` (default): each of the ``n_select`` output channels is a softmax-weighted mix of
the input bands; a low temperature makes every row nearly one-hot, i.e. a band pick, while
gradients can still move it to a better band in Phase 2. A detector behind it sees
``n_select`` channels.

``mode="soft"``: every band goes out, re-weighted: ``w = n_select * softmax(logits / T)`` (C,),
``selected = data * w``. The ``"variance"`` init sets ``logits = log(var)`` of the input bands
(so ``w`` grows as ``var ** (1 / T)``). A detector behind it sees all C bands; what the weights
change for RX is its ridge: RX's ``eps`` added to the covariance of the weighted bands is a
ridge of ``eps / w_c**2`` on band c in the selector's input units
(:meth:`SoftChannelSelector.effective_ridge`); with the guide's ``eps = 1e-6`` and
``T = 5`` that is 0.2 to 2 times the median band variance of the normalized bundled scenes.

Both maps are linear per pixel (a matrix, or a per-band scale), so moments flow through them
exactly and Phase 1 stays one data pass in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from torch import Tensor

from nodes.graph.base import Node, unfitted
from nodes.graph.ports import PortSpec
from nodes.graph.registry import register_node
from nodes.training.stats import MomentState

#: Softmax weight given to the picked band at initialization.
_PICK_WEIGHT = 0.98


@register_node
class SoftChannelSelector(Node):
    """Select ``n_select`` of ``input_channels`` bands through a trainable soft assignment.

    Args:
        n_select: Number of output channels (``"hard"``), or the total weight spread over the
            bands (``"soft"``).
        input_channels: Number of input bands C.
        init_method: ``"variance"`` fits in Phase 1 (hard: picks the bands of highest
            variance; soft: log-variance logits); ``"uniform"`` needs no fit (hard: evenly
            spaced bands; soft: equal weights ``n_select / C``).
        temperature_init: Softmax temperature.
        mode: ``"hard"`` (``n_select`` channels out) or ``"soft"`` (all C bands out,
            re-weighted); see the module docstring.
        name: Node name.

    Attributes:
        out_channels: Channels of ``selected``: ``n_select`` (hard) or ``input_channels``
            (soft); a detector behind the selector takes this many.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "data": PortSpec("float", ("B", "H", "W", "input_channels"), "input cube"),
    }
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {
        "selected": PortSpec("float", ("B", "H", "W", "out_channels"), "selected channels"),
        "weights": PortSpec("float", ("weight_rows", "input_channels"),
                            "selection matrix (hard) or band weights as one row (soft)"),
    }
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ("channel_logits",)
    DEFAULT_NAME: ClassVar[str | None] = "selector"
    MAIN_INPUT: ClassVar[str | None] = "data"
    MAIN_OUTPUT: ClassVar[str | None] = "selected"
    channel_logits: Tensor
    temperature: Tensor

    def __init__(
        self,
        n_select: int,
        input_channels: int,
        init_method: Literal["variance", "uniform"] = "variance",
        temperature_init: float = 5.0,
        mode: Literal["hard", "soft"] = "hard",
        name: str | None = None,
        execution_stages: Iterable[str] | None = None,
    ) -> None:
        super().__init__(name=name, execution_stages=execution_stages)
        if not 0 < n_select <= input_channels:
            raise ValueError(f"n_select must be in 1..{input_channels}, got {n_select}")
        if init_method not in ("variance", "uniform"):
            raise ValueError(f"init_method must be 'variance' or 'uniform', got {init_method!r}")
        if mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
        self.n_select = int(n_select)
        self.input_channels = int(input_channels)
        self.init_method = init_method
        self.mode = mode
        self.out_channels = self.n_select if mode == "hard" else self.input_channels
        self.weight_rows = self.n_select if mode == "hard" else 1
        self._remember(n_select=self.n_select, input_channels=self.input_channels,
                       init_method=init_method, temperature_init=float(temperature_init),
                       mode=mode)
        self.register_buffer("temperature", torch.tensor(float(temperature_init)))
        shape = (self.n_select, self.input_channels) if mode == "hard" else (self.input_channels,)
        self.declare_fitted(
            required=init_method == "variance", channel_logits=unfitted(*shape)
        )
        if init_method == "uniform":
            if mode == "soft":
                self.channel_logits = torch.zeros(self.input_channels)
                self._mark_fitted()
            else:
                picks = torch.linspace(0, self.input_channels - 1, self.n_select).round().long()
                self._set_picks(picks)

    @property
    def affine_keeps_minmax(self) -> bool:  # noqa: D102
        return self.mode == "soft"  # a positive per-band scale maps min/max exactly

    @property
    def is_affine(self) -> bool:  # noqa: D102
        return True

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
        """Indices (n_select,) of the dominant band per output channel, or the heaviest bands.

        Hard: the dominant band of each output channel. Soft: the ``n_select`` bands of
        largest weight, in band order.
        """
        logits = self.channel_logits.detach()
        if self.mode == "soft":
            return torch.topk(logits, self.n_select).indices.sort().values
        return logits.argmax(dim=1)

    def fit_from_moments(self, moments: MomentState) -> None:
        """Fit from the input's moments.

        Hard: pick the ``n_select`` bands of highest variance (in band order). Soft: set the
        logits to the log-variance of each band.
        """
        var = moments.var(ddof=1)
        if self.mode == "soft":
            # The floor keeps a constant band finite (its weight then is ~0).
            logits = torch.log(var.clamp_min(1e-30)).to(torch.float32)
            self.channel_logits = logits.to(self.channel_logits.device)
            self._mark_fitted()
            return
        picks = torch.topk(var, self.n_select).indices.sort().values
        self._set_picks(picks)

    def selection_matrix(self) -> Tensor:
        """Selection weights.

        Hard: softmax selection matrix (n_select, C). Soft: band weights (C,) summing to
        ``n_select``.
        """
        w = torch.softmax(self.channel_logits / self.temperature, dim=-1)
        return w * self.n_select if self.mode == "soft" else w

    def effective_ridge(self, eps: float) -> Tensor:
        """Per-band ridge (C,) that a covariance ``eps`` added after this selector amounts to.

        Soft mode: ``eps / w_c**2`` in the selector's input units (RX is otherwise invariant to
        a per-band scale). Hard mode: ``eps`` on each of the ``n_select`` selected channels.
        """
        self.check_initialized()
        w = self.selection_matrix().detach().double()
        if self.mode == "soft":
            return eps / w.square()
        return torch.full((self.n_select,), float(eps), dtype=torch.float64)

    def affine_map(self) -> tuple[Tensor, Tensor | None, bool] | None:  # noqa: D102
        if not self.is_initialized:
            return None
        w = self.selection_matrix().detach().double()
        # A positive per-band scale carries min/max exactly; a mixing matrix does not.
        return w, None, self.mode == "soft"

    def forward(self, data: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Select from ``data`` (B, H, W, C).

        Hard: mix it into (B, H, W, n_select). Soft: re-weight its bands, (B, H, W, C).
        """
        self.check_initialized()
        w = self.selection_matrix()
        if self.mode == "soft":
            return {"selected": data * w.to(data.dtype), "weights": w.unsqueeze(0)}
        return {"selected": data @ w.T.to(data.dtype), "weights": w}
