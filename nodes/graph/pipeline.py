"""The typed-port pipeline: building, checking, running, saving and loading a node graph.

Why one module of over 400 lines: :class:`Pipeline` is one class whose methods are the
guide's public API (``add_node``, ``connect``, ``forward``, ``save_to_file``,
``load_from_file``, ``unfreeze_nodes_by_name``); ports and nodes live in their own modules.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
import yaml
from torch import Tensor, nn

from nodes.errors import ConfigError, CubelineError, PipelineError, PortConnectionError
from nodes.graph.base import STAGES, Node
from nodes.graph.ports import PortRef, dtypes_compatible
from nodes.graph.registry import node_class

N = TypeVar("N", bound=Node)

FORMAT = "cubeline.pipeline/1"

#: Output key under which the batch's cube is exposed when a pipeline without a data node feeds
#: it to unconnected ``data`` inputs (and the root port Phase 1 accumulates moments at).
BATCH_CUBE = "batch.cube"


@dataclass
class PipelineMetadata:
    """Human metadata stored in a pipeline file."""

    name: str
    description: str = ""
    tags: list[str] = field(default_factory=list)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    """A connection ``src_node.src_port -> dst_node.dst_port``."""

    src: str
    src_port: str
    dst: str
    dst_port: str

    def __str__(self) -> str:
        return f"{self.src}.{self.src_port} -> {self.dst}.{self.dst_port}"


def _check_pair(out: PortRef, inp: PortRef) -> None:
    names = f"{out.qualified} -> {inp.qualified}"
    if not out.is_output:
        raise PortConnectionError(f"cannot connect {names}: {out.qualified} is an input port")
    if inp.is_output:
        raise PortConnectionError(f"cannot connect {names}: {inp.qualified} is an output port")
    if not dtypes_compatible(out.spec.dtype, inp.spec.dtype):
        raise PortConnectionError(
            f"cannot connect {names}: dtype {out.spec.dtype!r} of {out.qualified} does not "
            f"match dtype {inp.spec.dtype!r} of {inp.qualified}"
        )
    od, idims = out.resolved_dims(), inp.resolved_dims()
    if len(od) != len(idims):
        raise PortConnectionError(
            f"cannot connect {names}: {out.qualified} has dims {list(od)} but "
            f"{inp.qualified} expects {list(idims)}"
        )
    for a, b in zip(od, idims, strict=True):
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise PortConnectionError(
                f"cannot connect {names}: {out.qualified} gives {a} channels but "
                f"{inp.qualified} expects {b} (dims {list(od)} vs {list(idims)})"
            )


def _check_acyclic(edges: Sequence[Edge], pipeline_name: str) -> None:
    """Raise PortConnectionError if ``edges`` close a cycle (checked before any edge is added)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
        succ.setdefault(e.dst, set())
    indeg = dict.fromkeys(succ, 0)
    for targets in succ.values():
        for t in targets:
            indeg[t] += 1
    ready = [n for n, d in indeg.items() if d == 0]
    seen = 0
    while ready:
        n = ready.pop()
        seen += 1
        for t in succ[n]:
            indeg[t] -= 1
            if indeg[t] == 0:
                ready.append(t)
    if seen != len(succ):
        cyclic = sorted(n for n, d in indeg.items() if d > 0)
        raise PortConnectionError(
            f"cannot connect: the connections would close a cycle through nodes {cyclic} of "
            f"pipeline {pipeline_name!r}; a pipeline must be acyclic"
        )


class Pipeline(nn.Module):
    """A directed acyclic graph of :class:`~nodes.graph.base.Node` s joined port to port.

    Args:
        name: Pipeline name (used in saved files and model registries).
    """

    def __init__(self, name: str = "pipeline") -> None:
        super().__init__()
        self.name = name
        self.nodes = nn.ModuleDict()
        self.edges: list[Edge] = []
        self._topo_cache: list[str] | None = None
        self._pending_unfreeze: list[str] = []

    # ------------------------------------------------------------ building
    def _name_for(self, node: Node, taken: Mapping[str, Node]) -> str:
        """The name ``node`` gets in this pipeline, given the nodes in ``taken`` by name.

        A defaulted name that is taken gets the first free suffix ``_2``, ``_3``, ...; an
        explicit one is an error naming the clash.
        """
        existing = taken.get(node.name)
        if existing is None or existing is node:
            return node.name
        if not node.name_is_default:
            raise PipelineError(
                f"pipeline {self.name!r} already has a node named {node.name!r} "
                f"({type(existing).__name__}); pass a unique name=... to {type(node).__name__}"
            )
        i = 2
        while f"{node.name}_{i}" in taken:
            i += 1
        return f"{node.name}_{i}"

    def add_node(self, node: Node) -> Node:
        """Add a node; its name must be unique in the pipeline.

        A node whose name was defaulted (``RXGlobal()`` is ``rx_detector``) and is taken already
        is renamed with a numbered suffix (``rx_detector_2``); a clash of explicit names is a
        :class:`PipelineError`.
        """
        if not isinstance(node, Node):
            raise PipelineError(f"add_node expects a Node, got {type(node).__name__}")
        if any(n is node for n in self.nodes.values()):
            return node
        node.name = self._name_for(node, self._node_map())
        self.nodes[node.name] = node
        self._topo_cache = None
        return node

    def connect(self, *pairs: tuple[PortRef | str, PortRef | str]) -> Pipeline:
        """Connect ``(output_port, input_port)`` pairs, adding unknown nodes.

        Ports are written ``node.port`` (a :class:`PortRef`) or as ``"node.port"`` strings for
        nodes already in the pipeline. Every pair is checked before any is added.
        """
        resolved: list[tuple[PortRef, PortRef]] = []
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise PortConnectionError(f"connect() takes (output, input) pairs, got {pair!r}")
            out, inp = (self._port(p) for p in pair)
            _check_pair(out, inp)
            resolved.append((out, inp))
        # Names the new nodes will get (numbered where a defaulted name is taken), decided
        # before anything changes so a failing call leaves the pipeline as it was.
        by_name = self._node_map()
        planned: dict[int, str] = {id(n): n.name for n in by_name.values()}
        for out, inp in resolved:
            for node in (out.node, inp.node):
                if id(node) not in planned:
                    planned[id(node)] = self._name_for(node, by_name)
                    by_name[planned[id(node)]] = node
        new_edges = [
            (out, inp, Edge(planned[id(out.node)], out.name, planned[id(inp.node)], inp.name))
            for out, inp in resolved
        ]
        taken = {(e.dst, e.dst_port): e for e in self.edges}
        for out, inp, edge in new_edges:
            key = (edge.dst, edge.dst_port)
            if key in taken:
                raise PortConnectionError(
                    f"cannot connect {out.qualified} -> {inp.qualified}: {inp.qualified} is "
                    f"already fed by {taken[key].src}.{taken[key].src_port}"
                )
            taken[key] = edge
        _check_acyclic([*self.edges, *taken.values()], self.name)
        for out, inp, edge in new_edges:
            self.add_node(out.node)
            self.add_node(inp.node)
            self.edges.append(edge)
        self._topo_cache = None
        return self

    def _port(self, p: PortRef | str) -> PortRef:
        if isinstance(p, PortRef):
            return p
        if isinstance(p, str) and "." in p:
            node_name, port = p.rsplit(".", 1)
            if node_name not in self.nodes:
                raise PortConnectionError(
                    f"unknown node {node_name!r} in port {p!r}; nodes are {list(self.nodes)}"
                )
            ref = getattr(self.nodes[node_name], port)
            assert isinstance(ref, PortRef)
            return ref
        raise PortConnectionError(f"expected a port (node.port), got {p!r}")

    # ------------------------------------------------------------- queries
    @overload
    def node(self, name: str) -> Node: ...

    @overload
    def node(self, name: str, cls: type[N]) -> N: ...

    def node(self, name: str, cls: type[Node] = Node) -> Node:
        """The node called ``name``, checked to be a ``cls``: a typed lookup.

        Raises:
            PipelineError: No such node, or it is not a ``cls``.
        """
        if name not in self.nodes:
            raise PipelineError(
                f"pipeline {self.name!r} has no node {name!r}; its nodes are {list(self.nodes)}"
            )
        found = self.nodes[name]
        if not isinstance(found, cls):
            raise PipelineError(
                f"node {name!r} of pipeline {self.name!r} is a {type(found).__name__}, "
                f"not a {cls.__name__}"
            )
        return found

    def _node_map(self) -> dict[str, Node]:
        return {name: self.node(name) for name in self.nodes}

    def node_list(self) -> list[Node]:
        """Nodes in topological order."""
        return [self.node(n) for n in self.topological_order()]

    def topological_order(self) -> list[str]:
        """Node names sorted so every node comes after its inputs (stable: insertion order)."""
        cached = self._topo_cache
        if cached is not None and len(cached) == len(self.nodes):
            return cached
        names = list(self.nodes)
        indeg = dict.fromkeys(names, 0)
        succ: dict[str, list[str]] = {n: [] for n in names}
        for e in self.edges:
            indeg[e.dst] += 1
            succ[e.src].append(e.dst)
        order: list[str] = []
        ready = [n for n in names if indeg[n] == 0]
        while ready:
            n = ready.pop(0)
            order.append(n)
            for m in succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    ready.append(m)
        if len(order) != len(names):
            cyclic = sorted(set(names) - set(order))
            raise PipelineError(f"pipeline {self.name!r} has a cycle through nodes {cyclic}")
        self._topo_cache = order
        return order

    def inputs_of(self, node_name: str) -> dict[str, Edge]:
        """Edges feeding ``node_name``, by input port."""
        return {e.dst_port: e for e in self.edges if e.dst == node_name}

    def ancestors(self, node_names: Iterable[str]) -> set[str]:
        """The given nodes and every node upstream of them."""
        todo, seen = list(node_names), set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            todo.extend(e.src for e in self.edges if e.dst == n)
        return seen

    def implicit_cube_inputs(self) -> list[str]:
        """Nodes whose unconnected ``data`` input is fed the batch's cube (see :meth:`forward`).

        Only in a pipeline without a data node (a node that reads the batch itself): there the
        batch's ``cube`` is the one possible source. With a data node, an unconnected input stays
        an error, since the data node's ``cube`` port is then the explicit source to connect.
        """
        nodes = list(self._node_map().values())
        if any(n.consumes_batch for n in nodes):
            return []
        return [
            n.name for n in nodes
            if "data" in type(n).INPUT_SPECS and "data" not in self.inputs_of(n.name)
        ]

    def nodes_of_type(self, cls: type[Node]) -> list[Node]:
        """Nodes that are instances of ``cls`` (topological order)."""
        return [n for n in self.node_list() if isinstance(n, cls)]

    # -------------------------------------------------------------- running
    def forward(
        self,
        batch: Mapping[str, Any] | None = None,
        *,
        stage: str = "inference",
        outputs: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        """Run the graph on one batch.

        Args:
            batch: The batch dict (``cube``, ``mask``, ... as
                :meth:`~nodes.library.data_node.AnomalyDataNode.run_batch` reads it). Also
                accepted as ``batch=`` keyword.
            stage: ``train``, ``val``, ``test`` or ``inference``; nodes not active in the stage
                are skipped.
            outputs: Only compute what these ``"<node>.<port>"`` keys (or node names) need.
            **kwargs: Extra batch entries (e.g. ``cube=...``) merged into ``batch``.

        Returns:
            Every computed output, keyed ``"<node>.<port>"``.
        """
        if stage not in STAGES:
            raise PipelineError(f"unknown stage {stage!r}; use one of {list(STAGES)}")
        data: dict[str, Any] = dict(batch or {})
        data.update(kwargs)
        wanted: set[str] | None = None
        if outputs is not None:
            wanted = self.ancestors(o.split(".", 1)[0] for o in outputs)
        values: dict[str, Tensor] = {}
        implicit = set(self.implicit_cube_inputs())
        if implicit:
            if "cube" not in data:
                raise PipelineError(
                    f"nodes {sorted(implicit)} have no connection into their 'data' input and "
                    f"pipeline {self.name!r} has no data node, so they read the batch's 'cube', "
                    f"but the batch has none (keys: {sorted(data)}); pass batch={{'cube': ...}} "
                    "or connect a data node"
                )
            values[BATCH_CUBE] = data["cube"]
        for name in self.topological_order():
            node = self.node(name)
            if wanted is not None and name not in wanted:
                continue
            if stage not in node.execution_stages:
                continue
            if node.consumes_batch:
                result = node.run_batch(data)
            else:
                kw: dict[str, Tensor] = {}
                for port, edge in self.inputs_of(name).items():
                    key = f"{edge.src}.{edge.src_port}"
                    if key not in values:
                        raise PipelineError(
                            f"node {name!r} input {port!r} needs {key}, which did not run in "
                            f"stage {stage!r}; make {edge.src!r} active in that stage"
                        )
                    kw[port] = values[key]
                if name in implicit:
                    kw["data"] = values[BATCH_CUBE]
                missing = [
                    p for p, s in type(node).INPUT_SPECS.items() if p not in kw and not s.optional
                ]
                if missing:
                    raise PipelineError(
                        f"node {name!r} ({type(node).__name__}) has unconnected inputs {missing}; "
                        "connect them with pipeline.connect()"
                    )
                result = node(**kw)
            for port, value in result.items():
                values[f"{name}.{port}"] = value
        return values

    # ------------------------------------------------------ freeze / unfreeze
    def _named(self, names: Iterable[str], verb: str) -> list[Node]:
        names = list(names)
        unknown = [n for n in names if n not in self.nodes]
        if unknown:
            raise PipelineError(
                f"cannot {verb} unknown nodes {unknown}; nodes of pipeline {self.name!r} are "
                f"{list(self.nodes)} (trainable: "
                f"{[n.name for n in self.node_list() if n.TRAINABLE_BUFFERS]})"
            )
        return [self.node(n) for n in names]

    def unfreeze_nodes_by_name(self, names: Iterable[str]) -> None:
        """Turn the fitted buffers of the named nodes into trainable parameters."""
        nodes = self._named(names, "unfreeze")
        for node in nodes:  # check all before changing any
            if not node.TRAINABLE_BUFFERS:
                node.unfreeze()  # raises the explanatory error
            node.check_initialized()
        for node in nodes:
            node.unfreeze()

    def freeze_nodes_by_name(self, names: Iterable[str]) -> None:
        """Turn the named nodes' parameters back into frozen buffers."""
        for node in self._named(names, "freeze"):
            node.freeze()

    def unfrozen_node_names(self) -> list[str]:
        """Names of the nodes whose fitted buffers are currently parameters."""
        return [n.name for n in self.node_list() if n.TRAINABLE_BUFFERS and not n.is_frozen]

    # ------------------------------------------------------------ save/load
    def to_config(self, metadata: PipelineMetadata | None = None) -> dict[str, Any]:
        """The YAML-able description of the graph (no weights)."""
        meta = metadata or PipelineMetadata(name=self.name)
        if not meta.created:
            meta.created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        return {
            "format": FORMAT,
            "metadata": asdict(meta),
            "pipeline": {"name": self.name},
            "nodes": [
                {
                    "name": n.name,
                    "type": type(n).__name__,
                    "config": n.get_config(),
                    "unfrozen": bool(n.TRAINABLE_BUFFERS) and not n.is_frozen,
                }
                for n in self.node_list()
            ],
            "connections": [[f"{e.src}.{e.src_port}", f"{e.dst}.{e.dst_port}"] for e in self.edges],
        }

    def save_to_file(self, config_path: str | Path,
                     metadata: PipelineMetadata | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.yaml`` (graph) and ``<stem>.pt`` (weights) side by side.

        Both are written to temporary names first and renamed, so a failure leaves no half file.
        """
        cfg_path = Path(config_path)
        weights_path = cfg_path.with_suffix(".pt")
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.to_config(metadata)
        tmp_cfg = cfg_path.with_name(cfg_path.name + ".tmp")
        tmp_w = weights_path.with_name(weights_path.name + ".tmp")
        try:
            tmp_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
            state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
            torch.save(state, tmp_w)
            tmp_w.replace(weights_path)
            tmp_cfg.replace(cfg_path)
        finally:
            tmp_cfg.unlink(missing_ok=True)
            tmp_w.unlink(missing_ok=True)
        return cfg_path, weights_path

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, source: str = "pipeline config") -> Pipeline:
        """Rebuild the graph (unfitted) from :meth:`to_config` output."""
        if not isinstance(cfg, Mapping) or "nodes" not in cfg:
            raise ConfigError(f"{source}: not a cubeline pipeline file (no 'nodes' section)")
        fmt = cfg.get("format", FORMAT)
        if fmt != FORMAT:
            raise ConfigError(f"{source}: unsupported format {fmt!r}; this cubeline reads {FORMAT}")
        pipe = cls(str(cfg.get("pipeline", {}).get("name", "pipeline")))
        unfrozen: list[str] = []
        for i, spec in enumerate(cfg["nodes"]):
            try:
                name, type_name = spec["name"], spec["type"]
            except (KeyError, TypeError):
                raise ConfigError(f"{source}: nodes[{i}] needs 'name' and 'type'") from None
            klass = node_class(type_name, source=source)
            try:
                node = klass(name=name, **dict(spec.get("config") or {}))
            except TypeError as exc:
                raise ConfigError(f"{source}: node {name!r} ({type_name}): {exc}") from None
            pipe.add_node(node)
            if spec.get("unfrozen"):
                unfrozen.append(name)
        for j, conn in enumerate(cfg.get("connections") or []):
            try:
                pipe.connect((conn[0], conn[1]))
            except (PortConnectionError, IndexError, TypeError) as exc:
                raise ConfigError(f"{source}: connections[{j}] {conn!r}: {exc}") from None
        pipe._pending_unfreeze = unfrozen
        return pipe

    @classmethod
    def load_from_file(cls, config_path: str | Path, weights_path: str | Path | None = None,
                       device: str | torch.device = "cpu") -> Pipeline:
        """Rebuild a saved pipeline through the node registry and load its weights.

        Args:
            config_path: The YAML written by :meth:`save_to_file`.
            weights_path: The weights; defaults to the YAML's sibling ``.pt``.
            device: Where to put the pipeline.
        """
        cfg_path = Path(config_path)
        if not cfg_path.is_file():
            raise ConfigError(f"pipeline file {cfg_path} does not exist")
        try:
            cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{cfg_path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{cfg_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the "
                "pipeline as UTF-8 YAML"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{cfg_path}: cannot read it ({exc.strerror or exc})") from None
        try:
            pipe = cls.from_config(cfg, source=str(cfg_path))
        except CubelineError:
            raise
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
            raise ConfigError(
                f"{cfg_path}: not a valid pipeline file ({type(exc).__name__}: {exc}); re-export "
                "it with Pipeline.save_to_file()"
            ) from None
        wpath = Path(weights_path) if weights_path is not None else cfg_path.with_suffix(".pt")
        if wpath.exists() or weights_path is not None:
            pipe.load_weights(wpath)
        pipe._apply_pending_unfreeze()
        return pipe.to(device)

    def _apply_pending_unfreeze(self) -> None:
        names = self._pending_unfreeze
        ready = [n for n in names if self.nodes[n].is_initialized]
        if ready:
            self.unfreeze_nodes_by_name(ready)
        self._pending_unfreeze = []

    def load_weights(self, weights_path: str | Path) -> None:
        """Load a weights file (``torch.load(weights_only=True)``; never unpickles code)."""
        wpath = Path(weights_path)
        if not wpath.is_file():
            raise ConfigError(f"weights file {wpath} does not exist")
        try:
            state = torch.load(io.BytesIO(wpath.read_bytes()), map_location="cpu",
                               weights_only=True)
        except Exception as exc:  # UnpicklingError, EOFError, BadZipFile, RuntimeError, ...
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"weights file {wpath} cannot be loaded safely (weights_only=True): "
                f"{first}; re-export it with Pipeline.save_to_file()"
            ) from None
        if not isinstance(state, dict):
            raise ConfigError(f"weights file {wpath} does not hold a state dict")
        self.load_state_dict_resizing(state, source=str(wpath))

    def load_state_dict_resizing(self, state: Mapping[str, Tensor], *, source: str,
                                 strict: bool = True) -> None:
        """``load_state_dict`` that also fills lazily shaped buffers (e.g. per-band min/max).

        With ``strict=False`` only the given keys are loaded (a partial state, e.g. an
        initialization state); unknown keys are an error either way.
        """
        own = self.state_dict()
        missing = sorted(set(own) - set(state)) if strict else []
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"{source}: weights do not match the pipeline (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); load the weights saved with this YAML"
            )
        with torch.no_grad():
            for key, value in state.items():
                mod_name, _, attr = key.rpartition(".")
                module = self.get_submodule(mod_name)
                current = own[key]
                if current.shape != value.shape:
                    if current.numel() != 0:
                        raise ConfigError(
                            f"{source}: {key} has shape {tuple(value.shape)}, the pipeline "
                            f"expects {tuple(current.shape)}"
                        )
                    if isinstance(module, Node):
                        with contextlib.suppress(KeyError):  # a parameter: copied below
                            module.resize_buffer(attr, value.to(current.dtype).clone())
                            continue
                current.copy_(value.to(current.dtype))
