"""The explicit registry of node classes used to rebuild pipelines from YAML.

A pipeline file names a node *type*; it is looked up here, never imported from a path read from
the file, so loading a YAML file cannot run arbitrary code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

from nodes.errors import ConfigError

if TYPE_CHECKING:
    from nodes.graph.base import Node

NODE_REGISTRY: dict[str, type[Node]] = {}

#: Modules defining cubeline's own nodes: a fixed list in code, imported on the first lookup so a
#: fresh process (a Dask worker, an MLflow model server) knows them without importing ``nodes``.
BUILTIN_NODE_MODULES: tuple[str, ...] = (
    "nodes.library.data_node",
    "nodes.library.normalization",
    "nodes.library.selector",
    "nodes.library.rx",
    "nodes.library.pca",
    "nodes.library.heads",
    "nodes.library.losses",
    "nodes.library.metrics",
)


def load_builtin_nodes() -> None:
    """Import (and so register) every built-in node class."""
    for module in BUILTIN_NODE_MODULES:
        importlib.import_module(module)

N = TypeVar("N", bound="type[Node]")


def register_node(cls: N) -> N:
    """Class decorator adding a node class to :data:`NODE_REGISTRY` under its class name."""
    name = cls.__name__
    existing = NODE_REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ConfigError(f"a node class named {name!r} is already registered ({existing!r})")
    NODE_REGISTRY[name] = cls
    return cls


def node_class(type_name: str, *, source: str = "pipeline file") -> type[Node]:
    """Look up a registered node class, with an error listing the known ones."""
    if type_name not in NODE_REGISTRY:
        load_builtin_nodes()
    try:
        return NODE_REGISTRY[type_name]
    except KeyError:
        raise ConfigError(
            f"{source}: unknown node type {type_name!r}; registered types are "
            f"{sorted(NODE_REGISTRY)} (register custom nodes with @nodes.register_node)"
        ) from None
