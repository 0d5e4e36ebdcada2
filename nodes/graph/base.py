"""The node base class: typed ports, execution stages, the statistical and affine protocols.

Following anomalib, a node is a pure ``nn.Module``; fitted statistics live in registered buffers
that hold NaN until Phase 1 fills them, and using an unfitted node raises
:class:`~nodes.errors.NotInitializedError`. Lightning wrapping happens elsewhere
(:mod:`nodes.training.gradient_trainer`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from nodes.errors import CubelineError, NotInitializedError, PortConnectionError
from nodes.graph.ports import PortRef, PortSpec
from nodes.training.stats import MomentState

STAGES: tuple[str, ...] = ("train", "val", "test", "inference")


class UnknownPortError(PortConnectionError, AttributeError):
    """A port name that the node does not declare (also an AttributeError for ``hasattr``)."""


def unfitted(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A NaN placeholder for a fitted buffer of ``shape``: it fails loudly if used unfitted."""
    return torch.full(shape, float("nan"), dtype=dtype)


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

    Nodes written in the reference guide's pattern implement
    :meth:`statistical_initialization` instead: Phase 1 then feeds them a stream of their input
    ports (one extra pass each, see :class:`~nodes.training.statistical_trainer.FitReport`).

    Args:
        name: Unique name in the pipeline; defaults to the class's ``DEFAULT_NAME`` (the name the
            reference guide uses, e.g. ``"rx_detector"``), else the snake-cased class name. A
            defaulted name that is already taken in a pipeline gets a numbered suffix
            (``rx_detector_2``) when the node is added; an explicit one is an error.
        execution_stages: Stages this node runs in; defaults to ``DEFAULT_STAGES``.
    """

    INPUT_SPECS: ClassVar[dict[str, PortSpec]] = {}
    OUTPUT_SPECS: ClassVar[dict[str, PortSpec]] = {}
    DEFAULT_STAGES: ClassVar[frozenset[str]] = frozenset(STAGES)
    #: Name given when the constructor gets none (None: the snake-cased class name).
    DEFAULT_NAME: ClassVar[str | None] = None
    #: Fitted buffers that :meth:`unfreeze` turns into parameters.
    TRAINABLE_BUFFERS: ClassVar[tuple[str, ...]] = ()
    #: Buffers that hold the fitted statistics; assigning finite values to all of them by hand
    #: (a manual restore) marks the node initialized. Defaults to ``TRAINABLE_BUFFERS``.
    FITTED_BUFFERS: ClassVar[tuple[str, ...] | None] = None
    #: The port whose moments a statistical node fits on, and the port an affine map feeds.
    MAIN_INPUT: ClassVar[str | None] = None
    MAIN_OUTPUT: ClassVar[str | None] = None
    #: Nodes that read the batch dict itself (data nodes) instead of input ports.
    consumes_batch: ClassVar[bool] = False

    def __init__(self, name: str | None = None, execution_stages: Iterable[str] | None = None):
        super().__init__()
        self.name: str = name or self.DEFAULT_NAME or _snake(type(self).__name__)
        #: Whether ``name`` was defaulted (a pipeline may then number it to keep names unique).
        self.name_is_default: bool = not name
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
    def declare_fitted(self, *, required: bool = True, **buffers: Tensor) -> None:
        """Register the node's fitted statistics: one buffer each, plus the ``fitted`` flag.

        The one place a statistical node declares its fitted state. Buffers start as given
        (:func:`unfitted` for NaN placeholders) and are filled by :meth:`fit_from_moments` (or by
        hand, see :meth:`mark_initialized`); :meth:`check_initialized` guards their use, and a
        buffer declared with no elements (a per-band shape not known yet) is resized when a saved
        state is loaded (:meth:`resize_buffer`).

        Args:
            required: Whether Phase 1 must fit the node before use (e.g. False for a normalizer
                that scales each cube by its own range).
            **buffers: Buffer name -> initial tensor.
        """
        for bname, initial in buffers.items():
            self.register_buffer(bname, initial)
        self.register_buffer("fitted", torch.tensor(False))
        self._fit_required = bool(required)

    @property
    def requires_initial_fit(self) -> bool:
        """Whether Phase 1 must fit this node before it can be used.

        As declared with :meth:`declare_fitted`; otherwise True only for a node that implements
        :meth:`statistical_initialization` alone (the guide's pattern).
        """
        return bool(self.__dict__.get("_fit_required", False)) or self.fits_from_stream

    @property
    def fit_needs_minmax(self) -> bool:
        """Whether :meth:`fit_from_moments` needs exact per-channel min/max of its input."""
        return False

    def fit_from_moments(self, moments: MomentState) -> None:
        """Fit the node's buffers from the float64 moments of its ``MAIN_INPUT``."""
        raise NotImplementedError(f"{type(self).__name__} has no statistical initialization")

    def statistical_initialization(self, input_stream: Iterable[Mapping[str, Tensor]]) -> None:
        """Fit from a stream of batches, each a dict keyed by this node's input port names.

        The reference guide's entry point. Built-in nodes fit from moments: this default folds
        the stream's ``MAIN_INPUT`` into float64 moments and calls :meth:`fit_from_moments`.
        Custom nodes may override it instead of :meth:`fit_from_moments`; the
        :class:`~nodes.training.statistical_trainer.StatisticalTrainer` then feeds them the stream
        (one
        extra pass over the training data per such node) and marks them initialized.
        """
        from nodes.training.stats import MomentAccumulator

        if type(self).fit_from_moments is Node.fit_from_moments or self.MAIN_INPUT is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no statistical initialization; implement "
                "statistical_initialization(self, input_stream) or fit_from_moments(self, moments)"
            )
        acc: MomentAccumulator | None = None
        for item in input_stream:
            x = item[self.MAIN_INPUT]
            x = x.reshape(-1, x.shape[-1]) if x.ndim == 4 else x.reshape(-1, 1)
            if acc is None:
                acc = MomentAccumulator(int(x.shape[1]), device=x.device)
            acc.update(x)
        if acc is None:
            raise CubelineError(f"node {self.name!r}: the input stream held no batch")
        self.fit_from_moments(acc.finalize())

    @property
    def fits_from_stream(self) -> bool:
        """Whether Phase 1 must feed this node a stream (it overrides only the stream method)."""
        cls = type(self)
        return (cls.statistical_initialization is not Node.statistical_initialization
                and cls.fit_from_moments is Node.fit_from_moments)

    def _mark_fitted(self) -> None:
        self._set_fitted(True)

    def _set_fitted(self, value: bool) -> None:
        flag = self._buffers.get("fitted")
        if flag is not None:
            flag.fill_(bool(value))
        else:  # a custom node without the flag buffer (e.g. written in the guide's pattern)
            self.__dict__["_fitted_flag"] = bool(value)

    @property
    def is_initialized(self) -> bool:
        """True for a node that needs no fit or whose fit has been done (or loaded)."""
        if not self.requires_initial_fit:
            return True
        flag = self._buffers.get("fitted")
        if flag is None:
            return bool(self.__dict__.get("_fitted_flag", False))
        return bool(flag.item())

    def _fitted_buffer_names(self) -> tuple[str, ...]:
        names = self.FITTED_BUFFERS
        return self.TRAINABLE_BUFFERS if names is None else names

    def mark_initialized(self) -> None:
        """Declare the node fitted after its statistics were set by hand (a manual restore).

        Raises:
            NotInitializedError: A fitted buffer still holds NaN (never assigned).
        """
        for bname in self._fitted_buffer_names():
            value = getattr(self, bname, None)
            if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                raise NotInitializedError(
                    f"node {self.name!r} ({type(self).__name__}): {bname} holds NaN; assign "
                    f"all of {list(self._fitted_buffer_names())} before marking it initialized"
                )
        self._set_fitted(True)

    @property
    def _statistically_initialized(self) -> bool:
        # The guide's spelling, kept for users coming from it (settable, as the guide does).
        return self.is_initialized

    @_statistically_initialized.setter
    def _statistically_initialized(self, value: bool) -> None:
        if value:
            self.mark_initialized()
        else:
            self._set_fitted(False)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # A manual restore (node.mu = ..., node.sigma = ...) marks the node initialized once every
        # fitted buffer holds finite values, whatever the order of the assignments.
        if (
            isinstance(value, Tensor)
            and name in self._fitted_buffer_names()
            and not self.is_initialized
            and all(
                isinstance(t := getattr(self, b, None), Tensor) and t.numel() > 0
                and bool(torch.isfinite(t).all())
                for b in self._fitted_buffer_names()
            )
        ):
            self._set_fitted(True)

    def check_initialized(self) -> None:
        """Raise :class:`NotInitializedError` if Phase 1 has not fitted this node."""
        if not self.is_initialized:
            raise NotInitializedError(
                f"node {self.name!r} ({type(self).__name__}) is not initialized: run "
                "StatisticalTrainer.fit() first, or restore an initialization state with "
                "nodes.training.init_state.load_init_state()"
            )

    # ------------------------------------------------------------ affine part
    @property
    def is_affine(self) -> bool:
        """Whether ``MAIN_OUTPUT`` is a fixed affine map of ``MAIN_INPUT`` once fitted.

        False here; affine nodes override it (and :meth:`affine_map`).
        """
        return False

    @property
    def affine_keeps_minmax(self) -> bool:
        """Whether the affine map carries per-channel min/max exactly (positive scaling)."""
        return False

    def resize_buffer(self, name: str, value: Tensor) -> None:
        """Replace a buffer by one of another shape (a lazily shaped fitted buffer being loaded).

        Raises:
            KeyError: ``name`` is not a buffer of this node.
        """
        if name not in self._buffers:
            raise KeyError(f"node {self.name!r} has no buffer {name!r}")
        self._buffers[name] = value

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

    @property
    def freezed(self) -> bool:
        """The guide's name for :attr:`is_frozen`: False once the node is unfrozen for training."""
        return self.is_frozen

    @freezed.setter
    def freezed(self, value: bool) -> None:
        if value:
            self.freeze()
        else:
            self.unfreeze()

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
