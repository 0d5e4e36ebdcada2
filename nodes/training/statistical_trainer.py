"""Phase 1: statistical initialization in as few passes over the data as the graph allows.

Plan: for each statistical node, walk upstream from its main input through *affine* nodes
(normalizer, selector, PCA, ...) to the first non-affine output — its *root*. One streaming pass
accumulates float64 moments (:class:`~nodes.training.stats.MomentAccumulator`) at every root whose
upstream nodes are already fitted; the nodes are then fitted in topological order from the root
moments pushed through the (now fitted) affine maps. A chain normalizer → selector → RX thus costs
one pass; a node behind a non-affine one (e.g. a logit head behind RX) needs one more.

Nodes written in the reference guide's pattern (they implement only
``statistical_initialization(input_stream)``) are fitted from a stream of their input ports,
one extra pass each, once everything upstream of them is fitted. In a pipeline without a data
node, an unconnected ``data`` input reads the batch's cube
(:data:`nodes.graph.pipeline.BATCH_CUBE`),
so a statistical node added alone can be fitted.

Why one module of over 400 lines: the pass planner, the pass and the fitting order are one
algorithm (a plan is only meaningful to the pass that runs it); the accumulators, shards and
state files live in their own modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from nodes.errors import CubelineError, DataValidationError, PipelineError
from nodes.graph.base import Node
from nodes.graph.pipeline import BATCH_CUBE, Pipeline
from nodes.library.data_node import AnomalyDataNode
from nodes.library.metrics import AnomalyDetectionMetrics, warn_if_no_anomalies
from nodes.library.rx import RXGlobal
from nodes.training.quality import (
    MAX_HELD_OUT_RATIO,
    MIN_FIT_RATIO,
    InitializationQualityError,
    InitQuality,
    assess,
    fit_ratio,
)
from nodes.training.results import Results
from nodes.training.stats import MomentAccumulator, MomentState, merge_all


class DataModule(Protocol):
    """What Phase 1 reads: ``train_dataloader()`` yielding batch dicts (``cube``, ``mask``).

    ``val_dataloader()`` too for the initialization check, and ``setup(stage)`` is called first
    where there is one: a Lightning ``LightningDataModule`` such as
    :class:`~nodes.data.CubeDataModule` is a DataModule. Where it also has
    ``frame_batches(split)`` returning an iterator of one-frame batches, or None, Phase 1 reads
    that instead: its sums do not depend on how frames are batched, and one-frame batches need
    no stacking copy (:meth:`nodes.data.CubeDataModule.frame_batches`).
    """

    def train_dataloader(self) -> Any:
        """Batches of the training split."""


@dataclass
class FitReport:
    """What a Phase-1 fit did.

    Attributes:
        passes: Number of passes over the training data.
        pixels: Pixels accumulated in the first pass (after masking and subsampling).
        seconds: Wall time of the fit.
        root_moments: Moments collected at each root port (``"<node>.<port>"``); the data node's
            cube moments are the raw-band statistics the drift check compares against.
        fitted: Names of the nodes fitted, in order.
        plan: For each fitted node, its root port and the affine chain between.
        stream_fitted: Nodes fitted through their own ``statistical_initialization`` stream (the
            guide's pattern); each cost one extra pass over the training data, counted in
            ``passes``.
        quality: Per RX node, its initialization quality (:mod:`nodes.training.quality`): the fit
        ratio
            after ``fit``, plus the held-out ratio after
            :meth:`StatisticalTrainer.check_initialization`.
        trimmed: Per RX node refitted without outliers (``trim_quantile``): the quantile, the
            score threshold and the pixels kept and dropped (two extra passes, in ``passes``).
    """

    passes: int = 0
    pixels: int = 0
    seconds: float = 0.0
    root_moments: dict[str, MomentState] = field(default_factory=dict)
    fitted: list[str] = field(default_factory=list)
    plan: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    stream_fitted: list[str] = field(default_factory=list)
    quality: dict[str, InitQuality] = field(default_factory=dict)
    trimmed: dict[str, dict[str, float]] = field(default_factory=dict)


def _as_samples(t: Tensor) -> Tensor:
    """Pixel rows: (B, H, W, C) → (N, C); (B, H, W) → (N, 1)."""
    if t.ndim == 4:
        return t.reshape(-1, t.shape[-1])
    if t.ndim == 3:
        return t.reshape(-1, 1)
    raise PipelineError(f"cannot take pixel moments of a tensor of shape {tuple(t.shape)}")


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_merge(state: MomentState) -> MomentState:
    """Merge the moment states of every DDP rank; every rank returns the same global state.

    States are gathered (not summed: means and centred Gram matrices do not add) and merged in
    rank order with the exact pairwise formula, so the result equals a single-process pass to
    float64 rounding. Without an initialized process group this is the identity.
    """
    _, world = _rank_world()
    if world == 1:
        return state
    dist = torch.distributed
    packed = torch.cat([state.n.reshape(1), state.mean, state.m2.reshape(-1), state.min,
                        state.max])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    c = state.num_channels
    parts = []
    for g in gathered:
        n, rest = g[0], g[1:]
        parts.append(MomentState(n=n, mean=rest[:c], m2=rest[c : c + c * c].reshape(c, c),
                                 min=rest[c + c * c : 2 * c + c * c], max=rest[2 * c + c * c :]))
    return merge_all(parts)


def _width_of(pipeline: Pipeline, root: str) -> int:
    if root == BATCH_CUBE:  # as wide as the node it feeds expects
        for name in pipeline.implicit_cube_inputs():
            node = pipeline.node(name)
            width = node.data.resolved_dims()[-1]
            if isinstance(width, int):
                return width
        raise PipelineError(f"rank has no batch and cannot infer the width of {root}")
    node_name, port = root.split(".", 1)
    src = pipeline.node(node_name)
    spec = type(src).OUTPUT_SPECS[port]
    if len(spec.dims) == 3:
        return 1
    width = getattr(src, spec.dims[-1], None)
    if not isinstance(width, int):
        raise PipelineError(f"rank has no batch and cannot infer the width of {root}")
    return width


def _to_host(state: MomentState) -> MomentState:
    """The state on the CPU, in one device-to-host copy (the identity on the CPU)."""
    if state.mean.device.type == "cpu":
        return state
    c = state.num_channels
    flat = torch.cat([state.n.reshape(1), state.mean, state.m2.reshape(-1), state.min,
                      state.max]).cpu()
    parts = flat.split([1, c, c * c, c, c])
    return MomentState(n=parts[0].reshape(()).clone(), mean=parts[1].clone(),
                       m2=parts[2].reshape(c, c).clone(), min=parts[3].clone(),
                       max=parts[4].clone())


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
    }


@dataclass(frozen=True)
class PassOptions:
    """How a Phase-1 pass selects pixels (picklable, sent to shard workers).

    Attributes:
        normal_only: Drop pixels the data node's mask marks as anomalous.
        sample_fraction: Keep this random fraction of pixels (None: all).
        seed: Seed of the subsampling; the draw for a frame depends only on (seed, frame id),
            so a sharded pass keeps exactly the pixels a single-process pass keeps.
        chunk_pixels: Pixels per float64 GEMM of the accumulators.
    """

    normal_only: bool = False
    sample_fraction: float | None = None
    seed: int = 0
    chunk_pixels: int | None = None


#: ``runner(pipeline, roots, options) -> {root: globally merged MomentState}``: runs one pass
#: elsewhere (e.g. sharded over Dask workers, see :mod:`nodes.training.sharding`).
ShardRunner = Callable[[Pipeline, list[str], PassOptions], dict[str, MomentState]]


def _mask_key(pipeline: Pipeline) -> str | None:
    for n in pipeline.node_list():
        if isinstance(n, AnomalyDataNode):
            return f"{n.name}.mask"
    return None


def _pixel_selection(batch: Mapping[str, Any], out: Mapping[str, Tensor], mask_key: str | None,
                     options: PassOptions, gen: torch.Generator) -> Tensor | None:
    keep: Tensor | None = None
    if options.normal_only:
        if mask_key is None or mask_key not in out:
            raise PipelineError(
                "normal_only=True needs an AnomalyDataNode whose mask marks the anomalies"
            )
        keep = ~out[mask_key].reshape(-1)
    frac = options.sample_fraction
    if frac is not None and frac < 1.0:
        cube = batch["cube"]
        b, per_frame = cube.shape[0], cube.shape[1] * cube.shape[2]
        ids = batch.get("frame_id")
        draws = []
        for i in range(b):
            if ids is not None:  # per-frame seed: the same pixels whatever the sharding
                g = torch.Generator().manual_seed(options.seed * 1_000_003 + int(ids[i]))
            else:
                g = gen
            draws.append(torch.rand(per_frame, generator=g) < frac)
        pick = torch.cat(draws).to(cube.device)
        keep = pick if keep is None else keep & pick
    return keep


def accumulate_pass(pipeline: Pipeline, batches: Iterable[Mapping[str, Any]], roots: list[str],
                    options: PassOptions, device: torch.device | str = "cpu"
                    ) -> dict[str, MomentState]:
    """Fold ``batches`` into float64 moments at each root port (one pass, this process only).

    The building block of Phase 1, also run by shard workers on their share of the frames.
    Where ``batches`` is a :class:`BatchStream` of fresh batches, small ones (one frame) are
    held and summed several at a time (:class:`~nodes.training.stats.MomentAccumulator`'s
    ``gather``).
    """
    mask_key = _mask_key(pipeline)
    wanted = list(roots) + ([mask_key] if options.normal_only and mask_key else [])
    gen = torch.Generator().manual_seed(options.seed)
    accs: dict[str, MomentAccumulator] = {}
    gather = bool(getattr(batches, "fresh", False))
    with torch.no_grad():
        for batch in batches:
            out = pipeline.forward(batch, stage="train", outputs=wanted)
            keep = _pixel_selection(batch, out, mask_key, options, gen)
            for root in roots:
                x = _as_samples(out[root])
                if keep is not None:
                    x = x[keep]
                if root not in accs:
                    accs[root] = MomentAccumulator(x.shape[1], device=x.device,
                                                   chunk=options.chunk_pixels, gather=gather)
                accs[root].update(x)
                del x
            # drop this batch and its outputs before the loader builds the next one, so at
            # most one batch is alive at a time, besides small ones held by gather (peak
            # memory flat in the number of batches)
            del batch, out, keep
    return {
        root: accs[root].finalize() if root in accs
        # no batch here (e.g. a DDP rank or shard with no frames): the empty state merges away
        else MomentState.empty(_width_of(pipeline, root), device=device)
        for root in roots
    }


class BatchStream:
    """One pass of batches, and whether each is a fresh object that later ones never overwrite.

    Args:
        batches: The batches (iterated once).
        fresh: True where the source hands out new tensors per batch (a data module's frames,
            a torch ``DataLoader``); a pass may then hold small batches and sum several at
            once (:class:`~nodes.training.stats.MomentAccumulator`'s ``gather``).
    """

    def __init__(self, batches: Iterable[Mapping[str, Any]], *, fresh: bool) -> None:
        self._batches = batches
        self.fresh = fresh

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self._batches)


class StatisticalTrainer:
    """Fit the statistical nodes of a pipeline on a datamodule's training split.

    Args:
        pipeline: The pipeline to initialize.
        datamodule: A LightningDataModule (e.g. :class:`~nodes.data.CubeDataModule`), or any
            object with ``setup(stage)``, ``train_dataloader()`` and ``val_dataloader()``.
        normal_only: Exclude pixels labelled anomalous (via the data node's mask) from the
            statistics — the guide's best practice; default counts every pixel (textbook RX).
        sample_fraction: Keep this random fraction of pixels (seeded) to calibrate faster.
        seed: Seed of the pixel subsampling.
        device: Where to compute; defaults to the pipeline's device.
        refit: Also refit nodes that are already initialized.
        chunk_pixels: Pixels per float64 GEMM of the accumulators (default: by device).
        shard_runner: Run each pass elsewhere (e.g. sharded on Dask,
        :mod:`nodes.training.sharding`);
            default: in this process (DDP ranks each take every world-th batch and merge).
        trim_quantile: Robust RX statistics (the guide's ``remove_outliers``): after fitting an
            RX node, drop the training pixels whose score lies above this quantile of the
            scores and refit it on the rest (two extra passes, in this process). None (default)
            keeps every pixel. E.g. 0.99 drops the 1 % most anomalous-looking pixels, which in
            unlabelled data would otherwise widen the background covariance.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        datamodule: DataModule | None,
        *,
        normal_only: bool = False,
        sample_fraction: float | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        refit: bool = True,
        chunk_pixels: int | None = None,
        shard_runner: ShardRunner | None = None,
        trim_quantile: float | None = None,
    ) -> None:
        if sample_fraction is not None and not 0.0 < sample_fraction <= 1.0:
            raise CubelineError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
        if trim_quantile is not None and not 0.5 <= trim_quantile < 1.0:
            raise CubelineError(
                f"trim_quantile must be in [0.5, 1), got {trim_quantile}; e.g. 0.99 drops the "
                "1 % highest-scoring training pixels before refitting RX (None: keep all)"
            )
        self.trim_quantile = trim_quantile
        self.pipeline = pipeline
        self.datamodule = datamodule
        self.normal_only = normal_only
        self.sample_fraction = sample_fraction
        self.seed = seed
        self.refit = refit
        self.chunk_pixels = chunk_pixels
        self.shard_runner = shard_runner
        if device is None:
            tensors = [*pipeline.parameters(), *pipeline.buffers()]
            device = tensors[0].device if tensors else torch.device("cpu")
        self.device = torch.device(device)
        self.report = FitReport()

    # -------------------------------------------------------------- planning
    def _root_of(self, node: Node) -> tuple[str, list[str]]:
        """Root port of ``node`` and the affine chain from the root to the node."""
        p = self.pipeline
        chain: list[str] = []
        current = node
        implicit = set(p.implicit_cube_inputs())
        while True:
            port = current.MAIN_INPUT
            edge = p.inputs_of(current.name).get(port or "")
            if edge is None and port == "data" and current.name in implicit:
                return BATCH_CUBE, chain
            if edge is None:
                hint = ""
                if port == "data":
                    hint = (" (an unconnected 'data' input reads the batch's cube only in a "
                            "pipeline without a data node; this one has a data node, so connect "
                            f"(data_node.cube, {current.name}.data))")
                raise PipelineError(
                    f"statistical node {current.name!r} has no connection into its input "
                    f"{port!r}{hint}; connect it before StatisticalTrainer.fit()"
                )
            src = p.node(edge.src)
            passes_through = (
                src.is_affine
                and edge.src_port == src.MAIN_OUTPUT
                and (src.affine_keeps_minmax or not node.fit_needs_minmax)
            )
            if not passes_through:
                return f"{edge.src}.{edge.src_port}", chain
            chain.insert(0, src.name)
            current = src

    # --------------------------------------------------------------- running
    def _batches(self, split: str, *, shard: bool = False) -> BatchStream:
        dm = self.datamodule
        if dm is None:
            raise PipelineError("this StatisticalTrainer has no datamodule to read batches from")
        setup = getattr(dm, "setup", None)
        if setup is not None:
            setup("fit" if split == "train" else "validate")
        frames = getattr(dm, "frame_batches", None)
        loader: Iterable[Mapping[str, Any]] | None = frames(split) if callable(frames) else None
        # Batches a later one never overwrites: a data module's own frames, or a torch
        # DataLoader's collated (new) tensors. Passes may then hold a few small ones and sum
        # them together (MomentAccumulator's gather); any other iterable, or a DataLoader
        # without batching (its dataset's items as they are), might reuse its buffers.
        fresh = loader is not None
        if loader is None:
            loader = getattr(dm, f"{split}_dataloader")()
            fresh = isinstance(loader, DataLoader) and loader.batch_size is not None
        rank, world = _rank_world() if shard else (0, 1)
        return BatchStream(self._iterate(loader, split, rank, world), fresh=fresh)

    def _iterate(self, loader: Iterable[Mapping[str, Any]], split: str, rank: int, world: int
                 ) -> Iterator[dict[str, Any]]:
        count = 0
        # No enumerate(): it keeps its last (index, batch) tuple while fetching the next one,
        # and no reference is held while the consumer works or the loader builds the next
        # batch, so one batch is alive at a time (peak memory flat in the number of batches).
        for batch in loader:
            count += 1
            if (count - 1) % world == rank:  # DDP: each rank folds in every world-th batch
                moved = _to_device(batch, self.device)
                del batch
                yield moved
                del moved
            else:
                del batch
        if count == 0:
            raise DataValidationError(
                f"the {split} split of the datamodule is empty; give it at least one frame id"
            )

    def fit(self) -> FitReport:
        """Fit every statistical node; returns a :class:`FitReport`."""
        t0 = time.perf_counter()
        p = self.pipeline
        order = p.topological_order()
        pending = [
            n
            for n in p.node_list()
            if n.requires_initial_fit and (self.refit or not n.is_initialized)
        ]
        report = FitReport()
        while pending:
            pending_names = {n.name for n in pending}
            streamed = [n for n in pending if n.fits_from_stream]
            plans = {n.name: self._root_of(n) for n in pending if not n.fits_from_stream}
            # A node is ready when everything upstream of its root is fitted and every affine
            # node between root and node is fitted already or ready in this same pass.
            ready_names = {
                name for name, (root, _chain) in plans.items()
                if not (p.ancestors([root.split(".", 1)[0]]) & pending_names)
            }
            changed = True
            while changed:
                blocked = {
                    name for name in ready_names
                    if any(c in pending_names and c not in ready_names for c in plans[name][1])
                }
                changed = bool(blocked)
                ready_names -= blocked
            ready = [n for n in pending if n.name in ready_names]
            ready_streamed = [
                n for n in streamed if not ((p.ancestors([n.name]) - {n.name}) & pending_names)
            ]
            if not ready and not ready_streamed:  # cannot happen in a DAG; avoid an endless loop
                raise PipelineError(f"cannot order the statistical nodes {sorted(pending_names)}")
            for node in ready_streamed:
                self._fit_from_stream(node)
                report.passes += 1
                report.fitted.append(node.name)
                report.stream_fitted.append(node.name)
            pending = [n for n in pending if n not in ready_streamed]
            if not ready:
                continue
            roots = sorted({plans[n.name][0] for n in ready})
            # The nodes are fitted from host copies of the moments: a few tiny float64
            # operations each, which on a GPU would cost a launch (and often a sync) apiece.
            moments = {r: _to_host(m) for r, m in self._run_pass(roots).items()}
            report.passes += 1
            if not report.pixels:
                report.pixels = moments[roots[0]].count
            for root in roots:
                state = moments[root]
                if state.count < 2:
                    raise DataValidationError(
                        f"only {state.count} training pixels reached {root}; Phase 1 needs more "
                        "(check train_ids, normal_only and sample_fraction)"
                    )
                report.root_moments[root] = state
            # Each chain node's affine map is read once a pass, onto the moments' device: a node
            # is fitted (in topological order) before any node downstream asks for its map.
            maps: dict[str, tuple[Tensor, Tensor | None, bool]] = {}
            fitted_rx: dict[str, MomentState] = {}
            with torch.no_grad():
                for node in sorted(ready, key=lambda n: order.index(n.name)):
                    root, chain = plans[node.name]
                    m = moments[root]
                    for cname in chain:
                        if cname not in maps:
                            amap = p.node(cname).affine_map()
                            if amap is None:
                                raise PipelineError(f"node {cname!r} is not fitted yet")
                            a, b, keeps = amap
                            dev = m.mean.device
                            maps[cname] = (a.to(dev), None if b is None else b.to(dev), keeps)
                        a, b, keeps = maps[cname]
                        m = m.affine(a, b, keeps_minmax=keeps)
                    node.fit_from_moments(m)
                    report.fitted.append(node.name)
                    report.plan[node.name] = (root, chain)
                    if isinstance(node, RXGlobal):
                        fitted_rx[node.name] = m
            if self.trim_quantile is not None and fitted_rx:
                fitted_rx.update(self._trim_rx(fitted_rx, report))
                report.passes += 2
            for name, m in fitted_rx.items():
                rx = p.node(name, RXGlobal)
                report.quality[name] = assess(name, rx.num_channels, fit_ratio(rx, m),
                                              eps=rx.eps)
            fitted_rx.clear()
            pending = [n for n in pending if n not in ready]
        report.seconds = time.perf_counter() - t0
        self.report = report
        return report

    def _fit_from_stream(self, node: Node) -> None:
        """Feed ``node`` its input ports batch by batch (one pass) and mark it initialized.

        Every process reads the whole training split here (no sharding), so DDP ranks fit the
        same statistics; ``normal_only`` and ``sample_fraction`` select pixels of moment-fitted
        nodes only, since a stream keeps the (B, H, W, C) shape the node expects.
        """
        p = self.pipeline
        keys = {port: f"{e.src}.{e.src_port}" for port, e in p.inputs_of(node.name).items()}
        if "data" in type(node).INPUT_SPECS and node.name in p.implicit_cube_inputs():
            keys["data"] = BATCH_CUBE
        missing = [k for k, spec in type(node).INPUT_SPECS.items()
                   if k not in keys and not spec.optional]
        if missing:
            raise PipelineError(
                f"statistical node {node.name!r} has unconnected inputs {missing}; connect them "
                "before StatisticalTrainer.fit()"
            )
        trainer = self

        class _InputStream:
            """Re-iterable: each iteration is one pass over the training split."""

            def __iter__(self) -> Iterator[dict[str, Tensor]]:
                with torch.no_grad():
                    for batch in trainer._batches("train"):
                        out = p.forward(batch, stage="train", outputs=list(keys.values()))
                        yield {port: out[key] for port, key in keys.items()}

        with torch.no_grad():
            node.statistical_initialization(_InputStream())
        if not node.is_initialized:
            node.mark_initialized()

    def _input_key(self, node: Node) -> str:
        edge = self.pipeline.inputs_of(node.name).get("data")
        return BATCH_CUBE if edge is None else f"{edge.src}.{edge.src_port}"

    def _trim_rx(self, fitted: Mapping[str, MomentState], report: FitReport
                 ) -> dict[str, MomentState]:
        """Refit the RX nodes in ``fitted`` without their highest-scoring training pixels.

        Pass 1 histograms each node's scores (log10 bins of 0.001 decade: the threshold is the
        quantile to 0.23 %); pass 2 folds the input pixels scoring at or below the threshold
        into fresh moments, which the node is refitted from. Pixel selection (``normal_only``,
        ``sample_fraction``) is the fit's.
        """
        p = self.pipeline
        q = float(self.trim_quantile or 1.0)
        nodes = {n: p.node(n, RXGlobal) for n in fitted}
        keys = {n: (self._input_key(rx), f"{n}.scores") for n, rx in nodes.items()}
        lo, hi, bins = -12.0, 12.0, 24_000
        hists = {n: torch.zeros(bins, dtype=torch.float64) for n in nodes}
        mask_key = _mask_key(p)
        wanted = [k for pair in keys.values() for k in pair]
        wanted += [mask_key] if self.normal_only and mask_key else []

        def selected_passes() -> Iterator[tuple[dict[str, Tensor], Tensor | None]]:
            gen = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                for batch in self._batches("train"):
                    out = p.forward(batch, stage="train", outputs=wanted)
                    pair = (out, _pixel_selection(batch, out, mask_key, self.options, gen))
                    del batch, out  # one batch alive at a time, as in the moments pass
                    yield pair
                    del pair

        for out, keep in selected_passes():
            for n, (_, skey) in keys.items():
                sc = out[skey].reshape(-1).double()
                sc = sc if keep is None else sc[keep]
                logs = torch.log10(sc.clamp_min(10.0 ** lo)).cpu()
                hists[n] += torch.histc(logs, bins=bins, min=lo, max=hi)
            del out, keep, sc, logs
        thresholds: dict[str, float] = {}
        for n, h in hists.items():
            cum = torch.cumsum(h, 0)
            idx = int(torch.searchsorted(cum, q * float(cum[-1])))
            thresholds[n] = 10.0 ** (lo + (hi - lo) * (min(idx, bins - 1) + 1) / bins)
        accs: dict[str, MomentAccumulator] = {}
        for out, keep in selected_passes():
            for n, (ikey, skey) in keys.items():
                x, sc = _as_samples(out[ikey]), out[skey].reshape(-1)
                if keep is not None:
                    x, sc = x[keep], sc[keep]
                x = x[sc <= thresholds[n]]
                if n not in accs:
                    # x is a new (boolean-indexed) tensor: it may be held and summed with
                    # the next ones
                    accs[n] = MomentAccumulator(x.shape[1], device=x.device,
                                                chunk=self.chunk_pixels, gather=True)
                accs[n].update(x)
            del out, keep, x, sc
        trimmed: dict[str, MomentState] = {}
        with torch.no_grad():
            for n, rx in nodes.items():
                m = _to_host(accs[n].finalize())
                if m.count < 2:
                    raise DataValidationError(
                        f"trim_quantile={q} left {m.count} training pixels for {n!r}; use a "
                        "higher quantile or more data"
                    )
                rx.fit_from_moments(m)
                trimmed[n] = m
                before = fitted[n].count
                report.trimmed[n] = {"quantile": q, "threshold": thresholds[n],
                                     "kept": float(m.count), "dropped": float(before - m.count)}
        return trimmed

    def check_initialization(self, split: str = "val", *,
                             min_fit_ratio: float = MIN_FIT_RATIO,
                             max_held_out_ratio: float = MAX_HELD_OUT_RATIO,
                             strict: bool = False) -> dict[str, InitQuality]:
        """Check every fitted RX node on the normal pixels of ``split`` (one pass).

        The correct form of the guide's "Validate Initialization Quality" (see
        :mod:`nodes.training.quality`): the mean squared Mahalanobis distance of normal held-out
        pixels
        is compared with the channel count, and the fit ratio of :meth:`fit` with 1.

        Args:
            split: ``"val"`` or ``"test"`` (or ``"train"``).
            min_fit_ratio: Lowest acceptable fit ratio.
            max_held_out_ratio: Highest acceptable held-out ratio.
            strict: Raise :class:`~nodes.training.quality.InitializationQualityError` on a bad node.

        Returns:
            ``{node name: InitQuality}``, also stored in ``self.report.quality``.
        """
        p = self.pipeline
        rx_nodes: list[RXGlobal] = [n for n in p.node_list() if isinstance(n, RXGlobal)]
        missing = [n.name for n in rx_nodes if n.name not in self.report.quality]
        if missing:
            raise PipelineError(
                f"no fit ratio for RX nodes {missing}: run StatisticalTrainer.fit() first"
            )
        mask_key = _mask_key(p)
        wanted = [f"{n.name}.scores" for n in rx_nodes] + ([mask_key] if mask_key else [])
        sums = dict.fromkeys((n.name for n in rx_nodes), 0.0)
        count = 0
        with torch.no_grad():
            for batch in self._batches(split):
                out = p.forward(batch, stage="inference", outputs=wanted)
                normal = None if mask_key is None else ~out[mask_key].reshape(-1)
                for n in rx_nodes:
                    sc = out[f"{n.name}.scores"].reshape(-1).double()
                    sums[n.name] += float((sc if normal is None else sc[normal]).sum())
                count += int(normal.sum()) if normal is not None else int(
                    out[wanted[0]].numel())
        result: dict[str, InitQuality] = {}
        for n in rx_nodes:
            held = sums[n.name] / max(count, 1) / n.num_channels
            result[n.name] = assess(n.name, n.num_channels, self.report.quality[n.name].fit_ratio,
                                    held, split, eps=n.eps, min_fit_ratio=min_fit_ratio,
                                    max_held_out_ratio=max_held_out_ratio)
        self.report.quality.update(result)
        bad = [q for q in result.values() if not q.ok]
        if strict and bad:
            raise InitializationQualityError(
                "initialization failed its quality check: "
                + "; ".join(f"{q.node}: {' / '.join(q.reasons)}" for q in bad)
            )
        return result

    def _run_pass(self, roots: list[str]) -> dict[str, MomentState]:
        """One pass over the training data: global moments at every root port."""
        if self.shard_runner is not None:
            return self.shard_runner(self.pipeline, roots, self.options)
        moments = accumulate_pass(self.pipeline, self._batches("train", shard=True), roots,
                                  self.options, device=self.device)
        # DDP: every rank folded in its own batches; merge so all ranks hold the global state.
        return {r: all_merge(m) for r, m in moments.items()}

    @property
    def options(self) -> PassOptions:
        """The pixel-selection options of a pass (what shard workers need to know)."""
        return PassOptions(normal_only=self.normal_only, sample_fraction=self.sample_fraction,
                           seed=self.seed, chunk_pixels=self.chunk_pixels)

    def validate(self) -> Results:
        """Run the validation split; returns ``{"<metric node>/<metric>": value}``.

        The result is also readable in the guide's form, ``results["metrics"]``: a list of
        ``(name, value)`` named tuples. A split without anomalous pixels gives a
        :class:`~nodes.errors.NoAnomaliesWarning`.
        """
        return evaluate_pipeline(self.pipeline, self._batches("val"), stage="val")


def evaluate_pipeline(pipeline: Pipeline, batches: Iterable[Mapping[str, Any]],
                      stage: str = "val") -> Results:
    """Run ``batches`` through ``pipeline`` and collect every metric node's results."""
    metric_nodes = [n for n in pipeline.node_list() if isinstance(n, AnomalyDetectionMetrics)]
    if not metric_nodes:
        raise PipelineError("the pipeline has no metric node (e.g. AnomalyDetectionMetrics)")
    for m in metric_nodes:
        m.reset()
    frame_ids: list[int] = []
    with torch.no_grad():
        for batch in batches:
            pipeline.forward(batch, stage=stage)
            if isinstance(batch.get("frame_id"), Tensor):
                frame_ids.extend(int(i) for i in batch["frame_id"].reshape(-1))
    warn_if_no_anomalies(metric_nodes, stage, frame_ids or None, pipeline)
    return Results({f"{m.name}/{k}": v for m in metric_nodes for k, v in m.compute().items()})
