"""Typed ports: class-level port specifications and references to a node's port.

A node declares its ports once, as class attributes ``INPUT_SPECS`` / ``OUTPUT_SPECS``; the graph
checks dtype and dimensions when two ports are connected, so a wiring mistake fails at build time
with both ports named, not mid-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nodes.graph.base import Node

#: dtype families a port may accept; "float" accepts any floating dtype.
DTYPE_FAMILIES: dict[str, tuple[torch.dtype, ...]] = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "bool": (torch.bool,),
    "int": (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8),
    "any": (),
}


@dataclass(frozen=True)
class PortSpec:
    """Specification of one port.

    Attributes:
        dtype: dtype family: ``"float"``, ``"bool"``, ``"int"`` or ``"any"``.
        dims: Symbolic dimensions, e.g. ``("B", "H", "W", "C")``. A name that is an attribute of
            the node instance (``"num_channels"``) resolves to that attribute's value, so channel
            counts are checked at connect time.
        description: What flows through the port.
        optional: An input that may stay unconnected.
    """

    dtype: str
    dims: tuple[str, ...]
    description: str = ""
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_FAMILIES:
            raise ValueError(
                f"unknown dtype family {self.dtype!r}; use one of {list(DTYPE_FAMILIES)}"
            )


def dtypes_compatible(out_dtype: str, in_dtype: str) -> bool:
    """Whether an output of family ``out_dtype`` may feed an input of family ``in_dtype``."""
    return out_dtype == in_dtype or "any" in (out_dtype, in_dtype)


@dataclass(frozen=True)
class PortRef:
    """A port of a particular node instance, as written ``node.port_name``."""

    node: Node
    name: str
    spec: PortSpec
    is_output: bool

    @property
    def qualified(self) -> str:
        """``"<node>.<port>"``, the key of this port in a pipeline's output dict."""
        return f"{self.node.name}.{self.name}"

    def resolved_dims(self) -> tuple[int | str, ...]:
        """Dims with node attributes substituted (ints where known)."""
        out: list[int | str] = []
        for d in self.spec.dims:
            val = getattr(self.node, d, None) if d not in {"B", "H", "W", "N"} else None
            out.append(val if isinstance(val, int) and not isinstance(val, bool) else d)
        return tuple(out)

    def __repr__(self) -> str:
        kind = "output" if self.is_output else "input"
        return f"<{kind} port {self.qualified} {self.spec.dtype}{list(self.resolved_dims())}>"
