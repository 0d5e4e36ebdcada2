"""The node base class: typed ports, execution stages, the statistical and affine protocols.

Following anomalib, a node is a pure ``nn.Module``; fitted statistics live in registered buffers
that hold NaN until Phase 1 fills them, and using an unfitted node raises
:class:`~nodes.errors.NotInitializedError`. Lightning wrapping happens elsewhere
(:mod:`nodes.gradient_trainer`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from nodes.errors import CubelineError, NotInitializedError, PortConnectionError
from nodes.ports import PortRef, PortSpec
from nodes.stats import MomentState

STAGES: tuple[str, ...] = ("train", "val", "test", "inference")


class UnknownPortError(PortConnectionError, AttributeError):
    """A port name that the node does not declare (also an AttributeError for ``hasattr``)."""


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Node(nn.Module):
    """A pipeline node with class-level port specs.

    Subclasses declare ``INPUT_SPECS`` / ``OUTPUT_SPECS``, call :meth:`_remember` with their
    constructor arguments (used to save the pipeline as YAML) and implement ``forward(**inputs)``
    returning a dict keyed by output port names.

    Statistical nodes set ``requires_initial_fit = True`` and implement :meth:`fit_from_moments`,
    which receives the float64 moments of their ``MAIN_INPUT``. Affine nodes (``y = A x + b`` per
    pixel) implement :meth:`affine_map` so the moments of the raw data can be carried through them
    and Phase 1 reads the data once.

    Args:
        name: Unique name in the pipeline; defaults to the snake-cased class name.
        execution_stages: Stages this node runs in; defaults to ``DEFAULT_STAGES``.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {}
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {}
    DEFAULT_STAGES: ClassVar[frozenset[str]] = frozenset(STAGES)
    #: Fitted buffers that :meth:`unfreeze` turns into parameters.
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ()
    #: The port whose moments a statistical node fits on, and the port an affine map feeds.
    MAIN_INPUT: ClassVar[str | None] = None
    MAIN_OUTPUT: ClassVar[str | None] = None
    #: Nodes that read the batch dict itself (data nodes) instead of input ports.
    consumes_batch: ClassVar[bool] = False
    #: ``MAIN_OUTPUT`` is a fixed affine map of ``MAIN_INPUT`` once fitted (see affine_map).
    AFFINE: ClassVar[bool] = False
    #: That map carries per-channel min/max exactly (a positive per-channel scaling).
    AFFINE_KEEPS_MINMAX: ClassVar[bool] = False

    def __init__(self, name: str | None = None, execution_stages: Iterable[str] | None = None):
        super().__init__()
        self.name: str = name or _snake(type(self).__name__)
        stages = frozenset(execution_stages) if execution_stages is not None else None
        if stages is not None and not stages <= set(STAGES):
            raise CubelineError(
                f"node {self.name!r}: unknown execution stages {sorted(stages - set(STAGES))}; "
                f"use any of {list(STAGES)}"
            )
        self.execution_stages: frozenset[str] = stages or self.DEFAULT_STAGES
        self._config: dict[str, Any] = {}
        self._custom_stages = stages is not None

    # ------------------------------------------------------------------ ports
    def __getattr__(self, item: str) -> Any:
        cls = type(self)
        if item in cls.OUTPUT_SPECS:
            return PortRef(self, item, cls.OUTPUT_SPECS[item], is_output=True)
        if item in cls.INPUT_SPECS:
            return PortRef(self, item, cls.INPUT_SPECS[item], is_output=False)
        try:
            return super().__getattr__(item)
        except AttributeError:
            if item.startswith("_"):
                raise
            raise UnknownPortError(
                f"{cls.__name__} node {self.__dict__.get('name', '?')!r} has no port or "
                f"attribute {item!r}; its input ports are {sorted(cls.INPUT_SPECS)} and its "
                f"output ports are {sorted(cls.OUTPUT_SPECS)}"
            ) from None

    # ----------------------------------------------------------------- config
    def _remember(self, **kwargs: Any) -> None:
        """Record constructor arguments so the node can be rebuilt from YAML."""
        self._config.update(kwargs)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (without ``name``) that rebuild this node."""
        cfg = dict(self._config)
        if self._custom_stages:
            cfg["execution_stages"] = sorted(self.execution_stages)
        return cfg

    # ------------------------------------------------------- statistical part
    @property
    def requires_initial_fit(self) -> bool:
        """Whether Phase 1 must fit this node before it can be used."""
        return False

    @property
    def fit_needs_minmax(self) -> bool:
        """Whether :meth:`fit_from_moments` needs exact per-channel min/max of its input."""
        return False

    def fit_from_moments(self, moments: MomentState) -> None:
        """Fit the node's buffers from the float64 moments of its ``MAIN_INPUT``."""
        raise NotImplementedError(f"{type(self).__name__} has no statistical initialization")

    def _init_fit_flag(self) -> None:
        self.register_buffer("fitted", torch.tensor(False))

    def _mark_fitted(self) -> None:
        self.fitted.fill_(True)

    @property
    def is_initialized(self) -> bool:
        """True for a node that needs no fit or whose fit has been done (or loaded)."""
        if not self.requires_initial_fit:
            return True
        flag = self._buffers.get("fitted")
        return bool(flag is not None and flag.item())

    @property
    def _statistically_initialized(self) -> bool:
        # The guide's spelling, kept for users coming from it.
        return self.is_initialized

    def check_initialized(self) -> None:
        """Raise :class:`NotInitializedError` if Phase 1 has not fitted this node."""
        if not self.is_initialized:
            raise NotInitializedError(
                f"node {self.name!r} ({type(self).__name__}) is not initialized: run "
                "StatisticalTrainer.fit() first, or restore an initialization state with "
                "nodes.init_state.load_init_state()"
            )

    # ------------------------------------------------------------ affine part
    @property
    def is_affine(self) -> bool:
        """Whether ``MAIN_OUTPUT`` is a fixed affine map of ``MAIN_INPUT`` once fitted."""
        return self.AFFINE

    @property
    def affine_keeps_minmax(self) -> bool:
        """Whether the affine map carries per-channel min/max exactly (positive scaling)."""
        return self.AFFINE_KEEPS_MINMAX

    def affine_map(self) -> tuple[Tensor, Tensor | None, bool] | None:
        """``(A, b, keeps_minmax)`` with ``MAIN_OUTPUT = A @ MAIN_INPUT + b`` per pixel, or None.

        ``A`` is (K, C), or (C,) for a per-channel scale. Only valid once the node is fitted.
        """
        return None

    # ----------------------------------------------------- freeze / unfreeze
    @property
    def is_frozen(self) -> bool:
        """True when none of the trainable buffers is currently a parameter."""
        return not any(n in self._parameters for n in self.TRAINABLE_BUFFERS)

    def unfreeze(self) -> None:
        """Turn the node's fitted buffers into ``nn.Parameter`` s (state-dict keys unchanged)."""
        if not self.TRAINABLE_BUFFERS:
            raise CubelineError(
                f"node {self.name!r} ({type(self).__name__}) has nothing to train; "
                "leave it out of unfreeze_nodes_by_name()"
            )
        if not self.is_initialized:
            raise NotInitializedError(
                f"cannot unfreeze node {self.name!r} ({type(self).__name__}): it was never "
                "initialized; run StatisticalTrainer.fit() before unfreezing"
            )
        for bname in self.TRAINABLE_BUFFERS:
            if bname in self._buffers:
                value = self._buffers.pop(bname)
                assert value is not None
                self.register_parameter(bname, nn.Parameter(value.detach().clone()))

    def freeze(self) -> None:
        """Turn trainable parameters back into frozen buffers (state-dict keys unchanged)."""
        for bname in self.TRAINABLE_BUFFERS:
            if bname in self._parameters:
                value = self._parameters.pop(bname)
                assert value is not None
                self.register_buffer(bname, value.detach().clone())

    # --------------------------------------------------------------- running
    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Compute the output ports from the input ports."""
        raise NotImplementedError

    def run_batch(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Entry point of data nodes (``consumes_batch``)."""
        raise NotImplementedError(f"{type(self).__name__} does not read batches")

    def extra_repr(self) -> str:
        """Name and configuration for ``repr``."""
        return f"name={self.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in self._config.items())
