"""Sharded Phase 1: split the training frames, fold each shard in its own process, merge exactly.

A Phase-1 pass is a sum over pixels, so it splits over frames: each shard rebuilds the pipeline
*as fitted so far* from ``Pipeline.to_config()`` + ``state_dict()``, reads only its own frames
through a :class:`~nodes.data.CubeDataModule`, folds them with
:func:`~nodes.training.statistical_trainer.accumulate_pass` and returns its partial moment states as
plain tensor dicts. The driver merges them with the pairwise formula of Chan, Golub & LeVeque
(1979) (:func:`~nodes.training.stats.merge_all`), which is exact: the merged statistics equal a
single-process pass to float64 rounding, whatever the number of shards. Pixel subsampling is
seeded per frame id, so a shard keeps exactly the pixels a single process keeps.

Everything here is orchestrator-free: :class:`ShardedPassRunner` implements
:data:`~nodes.training.statistical_trainer.ShardRunner` on top of any ``map_fn(func, items) ->
results``
(a list comprehension, a process pool, Prefect tasks on Dask or Ray: see :mod:`tasks.sharding`).
Tasks and results are picklable (frozen dataclasses, tensors, Python scalars).

Why one module of about 400 lines: the shard spec, the shard run and the pass runner are the
three halves of one exact protocol (what a shard gets, what it returns, how it is merged).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nodes.errors import ConfigError, DataValidationError, PipelineError
from nodes.graph.pipeline import Pipeline
from nodes.graph.registry import load_builtin_nodes
from nodes.training.statistical_trainer import PassOptions, accumulate_pass
from nodes.training.stats import MomentState, merge_all

#: ``map_fn(func, items) -> results``: apply ``func`` to every item (anywhere), results in order.
MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]

#: Frames a shard worker may keep in memory between the passes of one fit (the default of
#: :class:`~nodes.data.CubeDataModule`).
DEFAULT_CACHE_BYTES = 2**31


@dataclass(frozen=True)
class ShardDataSpec:
    """Where the training frames are, as a worker needs it to build its own data module.

    Attributes:
        paths: Data files (``.npz``, ``.mat``, ``.cu3s``) in frame-id order; made absolute, so
            workers elsewhere need the same paths (a shared file system).
        frame_ids: Training frame ids (indices over the frames of ``paths``), split into shards.
        batch_size: Frames per batch inside a shard.
        annotation_path: COCO JSON (``image_id`` = frame id) when labels come from one.
        expected_channels: Band count every frame must have (checked by the worker's schema).
        normal_class_ids: Classes counted as normal when masks come from annotations.
        cache_bytes: Frame memory a worker may hold for the shards of one fit; frames beyond
            it are read again in a later pass.
    """

    paths: tuple[str, ...]
    frame_ids: tuple[int, ...]
    batch_size: int = 1
    annotation_path: str | None = None
    expected_channels: int | None = None
    normal_class_ids: tuple[int, ...] = (0,)
    cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("ShardDataSpec.paths is empty. Fix: give the data files.")
        if any(str(p) == "<memory>" for p in self.paths):
            raise ConfigError(
                "ShardDataSpec.paths: in-memory frames (CubeDataModule.from_arrays) cannot be "
                "sent to shard workers. Fix: write them to .npz files (keys cube, wavelengths, "
                "mask, class_mask) and build the data module over those files."
            )
        if not self.frame_ids:
            raise DataValidationError(
                "ShardDataSpec.frame_ids is empty: there are no training frames to shard. "
                "Fix: give at least one training frame id (params.yaml data.train_ids)."
            )
        if len(set(self.frame_ids)) != len(self.frame_ids):
            raise DataValidationError(
                f"ShardDataSpec.frame_ids lists frames more than once ({list(self.frame_ids)}). "
                "Fix: list each training frame once."
            )
        if self.batch_size < 1:
            raise ConfigError(f"ShardDataSpec.batch_size = {self.batch_size}: must be >= 1.")
        if self.cache_bytes < 0:
            raise ConfigError(f"ShardDataSpec.cache_bytes = {self.cache_bytes}: must be >= 0.")
        # Workers may run in another working directory: resolve relative paths here, once.
        object.__setattr__(self, "paths", tuple(str(Path(p).absolute()) for p in self.paths))
        object.__setattr__(self, "frame_ids", tuple(int(f) for f in self.frame_ids))
        object.__setattr__(self, "normal_class_ids", tuple(int(c) for c in self.normal_class_ids))
        if self.annotation_path is not None:
            object.__setattr__(self, "annotation_path", str(Path(self.annotation_path).absolute()))

    @classmethod
    def from_datamodule(cls, dm: Any, split: str = "train") -> ShardDataSpec:
        """The spec of a :class:`~nodes.data.CubeDataModule`'s split (same files, same labels).

        Args:
            dm: A file-backed ``CubeDataModule``.
            split: Which split's frames to shard.

        Returns:
            The spec.

        Raises:
            ConfigError: ``dm`` is not a file-backed data module.
        """
        needed = ("paths", "splits", "batch_size", "annotation_path", "expected_channels",
                  "normal_class_ids", "cache_bytes")
        if not all(hasattr(dm, a) for a in needed):
            raise ConfigError(
                f"cannot shard Phase 1 over a {type(dm).__name__}: it has no frame files. Fix: "
                "use nodes.data.CubeDataModule over .npz/.mat/.cu3s files."
            )
        return cls(
            paths=tuple(str(p) for p in dm.paths),
            frame_ids=tuple(dm.splits[split]),
            batch_size=int(dm.batch_size),
            annotation_path=None if dm.annotation_path is None else str(dm.annotation_path),
            expected_channels=dm.expected_channels,
            normal_class_ids=tuple(dm.normal_class_ids),
            cache_bytes=int(dm.cache_bytes),
        )


@dataclass(frozen=True)
class ShardTask:
    """One shard of one pass: everything a worker needs, nothing it must share.

    Attributes:
        pipeline_config: ``Pipeline.to_config()`` (rebuilt through the node registry).
        pipeline_state: ``state_dict()`` on the CPU, fitted buffers of the passes so far.
        training: The pipeline's ``nn.Module.training`` flag.
        data: The data spec (its ``frame_ids`` are all training frames).
        frame_ids: This shard's frames.
        roots: Root ports whose moments the pass collects.
        options: Pixel selection (normal-only, seeded subsampling).
        shard_index: Position of this shard (results merge in this order).
        n_shards: Number of (non-empty) shards of the pass.
        fit_token: Identifies the fit: a worker keeps the frames it read for later passes of
            the same fit. None reads afresh every pass.
        torch_threads: ``torch.set_num_threads`` in the worker (None: leave as is).
        device: Where the worker computes.
    """

    pipeline_config: dict[str, Any]
    pipeline_state: dict[str, Tensor]
    training: bool
    data: ShardDataSpec
    frame_ids: tuple[int, ...]
    roots: tuple[str, ...]
    options: PassOptions
    shard_index: int = 0
    n_shards: int = 1
    fit_token: str | None = None
    torch_threads: int | None = None
    device: str = "cpu"


def split_frames(frame_ids: Sequence[int], n_shards: int) -> list[tuple[int, ...]]:
    """Split frame ids into at most ``n_shards`` contiguous, non-empty shards of near-equal size.

    Contiguous runs keep consecutive frames of one ``.cu3s`` session together (one session
    open per shard); sizes differ by at most one frame.

    Args:
        frame_ids: Training frame ids, in order.
        n_shards: Wanted number of shards (fewer when there are fewer frames).

    Returns:
        The shards, in order; their concatenation is ``frame_ids``.

    Raises:
        ConfigError: ``n_shards`` < 1.
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ConfigError(
            f"n_shards = {n_shards!r}: must be a positive integer (params.yaml "
            "phase1.sharding.n_shards)."
        )
    ids = list(frame_ids)
    k = min(n_shards, len(ids))
    if k == 0:
        return []
    base, extra = divmod(len(ids), k)
    shards, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        shards.append(tuple(ids[start : start + size]))
        start += size
    return shards


# ------------------------------------------------------------------------------------ worker
def rebuild_pipeline(config: Mapping[str, Any], state: Mapping[str, Tensor],
                     *, training: bool = True, device: str | torch.device = "cpu") -> Pipeline:
    """Rebuild a pipeline from its config and state dict, tensor for tensor.

    ``load_state_dict_resizing`` casts values to the freshly built buffers' dtypes; a tensor
    whose dtype the sender had changed (e.g. a pipeline moved to float64) is put back as sent,
    so the worker computes with exactly the sender's model.

    Node types resolve through the registry (the built-in node modules are imported first; a
    custom node's module must be importable and imported by the worker, e.g. via the module
    that defines the task).

    Raises:
        ConfigError: A node type is not registered in the worker.
        PipelineError: The rebuilt pipeline's state differs from the one sent.
    """
    load_builtin_nodes()  # a fresh worker has imported none of the node modules yet
    pipe = Pipeline.from_config(config, source="shard task pipeline config")
    pipe.load_state_dict_resizing(state, source="shard task pipeline state")
    with torch.no_grad():
        for key, value in state.items():
            mod_name, _, attr = key.rpartition(".")
            module = pipe.get_submodule(mod_name)
            if attr in module._buffers:
                current = module._buffers[attr]
                if current is not None and current.dtype != value.dtype:
                    module._buffers[attr] = value.clone()
            elif attr in module._parameters:
                param = module._parameters[attr]
                if param is not None and param.dtype != value.dtype:
                    param.data = value.clone()
    rebuilt = pipe.state_dict()
    bad = [
        k for k, v in state.items()
        if rebuilt[k].dtype != v.dtype or rebuilt[k].shape != v.shape
        or not torch.equal(rebuilt[k].nan_to_num(0.0) if v.is_floating_point() else rebuilt[k],
                           v.nan_to_num(0.0) if v.is_floating_point() else v)
    ]
    if bad:
        raise PipelineError(
            f"shard worker: the rebuilt pipeline differs from the sender's in {bad[:5]}; the "
            "worker and the driver must run the same cubeline version"
        )
    return pipe.train(training).to(device)


_CACHE_LOCK = threading.Lock()
#: Worker-side data modules of the current fit: ``(fit_token, shard frames) -> CubeDataModule``.
_SHARD_DMS: dict[tuple[str, tuple[int, ...]], Any] = {}


def release_shard_cache(fit_token: str | None = None) -> int:
    """Drop the frames a worker keeps for a fit (all fits when ``fit_token`` is None).

    Returns:
        Number of shard data modules released.
    """
    with _CACHE_LOCK:
        keys = [k for k in _SHARD_DMS if fit_token is None or k[0] == fit_token]
        for k in keys:
            del _SHARD_DMS[k]
    return len(keys)


def _build_dm(spec: ShardDataSpec, frame_ids: tuple[int, ...], cache_bytes: int) -> Any:
    from nodes.data.datamodule import CubeDataModule

    ids = list(frame_ids)
    # val/test must be non-empty; naming the shard's own frames reads nothing extra.
    dm = CubeDataModule(
        list(spec.paths), ids, ids, ids, batch_size=spec.batch_size,
        annotation_path=spec.annotation_path, expected_channels=spec.expected_channels,
        cache_bytes=cache_bytes, normal_class_ids=spec.normal_class_ids,
    )
    dm.setup("fit")
    return dm


def _shard_datamodule(task: ShardTask) -> tuple[Any, bool]:
    """The shard's set-up data module and whether it was reused from an earlier pass."""
    if task.fit_token is None:
        return _build_dm(task.data, task.frame_ids, task.data.cache_bytes), False
    key = (task.fit_token, task.frame_ids)
    with _CACHE_LOCK:
        dm = _SHARD_DMS.get(key)
        if dm is not None:
            return dm, True
        # A worker serves one fit at a time: frames of earlier fits go.
        for k in [k for k in _SHARD_DMS if k[0] != task.fit_token]:
            del _SHARD_DMS[k]
        # Shards of this fit on this worker share one frame budget.
        used = sum(int(d.describe()["cached_bytes"]) for d in _SHARD_DMS.values())
        dm = _build_dm(task.data, task.frame_ids, max(0, task.data.cache_bytes - used))
        _SHARD_DMS[key] = dm
        return dm, False


def run_shard(shard: ShardTask) -> dict[str, Any]:
    """Fold one shard's frames into moment states (runs in a worker).

    Returns:
        A plain dict: ``moments`` (``{root: MomentState.to_dict()}``), ``shard_index``,
        ``frame_ids``, ``pixels`` (at the first root), ``timings`` (seconds to rebuild the
        pipeline, read and validate the frames, fold them), ``reused_frames``, ``worker``
        (``host:pid``) and ``torch_threads``.
    """
    t0 = time.perf_counter()
    if shard.torch_threads is not None:
        torch.set_num_threads(shard.torch_threads)
    pipeline = rebuild_pipeline(shard.pipeline_config, shard.pipeline_state,
                                training=shard.training, device=shard.device)
    t1 = time.perf_counter()
    dm, reused = _shard_datamodule(shard)
    t2 = time.perf_counter()
    device = torch.device(shard.device)
    batches = (
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()}
        for b in dm.train_dataloader()
    )
    moments = accumulate_pass(pipeline, batches, list(shard.roots), shard.options, device=device)
    t3 = time.perf_counter()
    first = moments[shard.roots[0]] if shard.roots else None
    return {
        "shard_index": shard.shard_index,
        "frame_ids": list(shard.frame_ids),
        "moments": {root: m.to_dict() for root, m in moments.items()},
        "pixels": first.count if first is not None else 0,
        "timings": {"rebuild_s": t1 - t0, "read_s": t2 - t1, "pass_s": t3 - t2,
                    "total_s": t3 - t0},
        "reused_frames": reused,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------ driver
def serial_map(func: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """The in-process ``map_fn``: one item after the other in this process."""
    return [func(item) for item in items]


@dataclass
class PassRecord:
    """What one sharded pass did (for reports and benchmarks).

    Attributes:
        roots: Root ports of the pass.
        shards: Frame ids per shard.
        seconds: Wall time of the pass as seen by the driver (map + merge).
        results: The workers' results without their moments (timings, worker, reuse).
    """

    roots: list[str]
    shards: list[tuple[int, ...]]
    seconds: float
    results: list[dict[str, Any]] = field(default_factory=list)


class ShardedPassRunner:
    """A :data:`~nodes.training.statistical_trainer.ShardRunner` over any ``map_fn``.

    ``StatisticalTrainer(..., shard_runner=ShardedPassRunner(map_fn, spec, n_shards))`` runs
    each Phase-1 pass as ``n_shards`` shard tasks through ``map_fn`` and merges their states in
    shard order. Call :meth:`close` (or use it as a context manager) when the fit is done so
    workers drop the frames they keep between passes.

    Args:
        map_fn: ``map_fn(func, items) -> results`` in item order, e.g. :func:`serial_map`.
        data_spec: The training frames (or a file-backed ``CubeDataModule``).
        n_shards: Number of shards (at most one per frame).
        torch_threads: Threads each worker gives torch (None: leave the worker's setting).
        reuse_frames: Let workers keep a shard's frames for the later passes of this fit.
        device: Where workers compute.
    """

    def __init__(self, map_fn: MapFn, data_spec: ShardDataSpec | Any, n_shards: int, *,
                 torch_threads: int | None = None, reuse_frames: bool = True,
                 device: str = "cpu") -> None:
        self.map_fn = map_fn
        self.data_spec = (data_spec if isinstance(data_spec, ShardDataSpec)
                          else ShardDataSpec.from_datamodule(data_spec))
        self.shards = split_frames(self.data_spec.frame_ids, n_shards)
        self.n_shards = len(self.shards)
        self.torch_threads = torch_threads
        self.device = device
        self.fit_token: str | None = uuid.uuid4().hex if reuse_frames else None
        self.passes: list[PassRecord] = []

    def tasks(self, pipeline: Pipeline, roots: Sequence[str],
              options: PassOptions) -> list[ShardTask]:
        """The shard tasks of one pass over ``pipeline`` as it is now."""
        config = pipeline.to_config()
        state = {k: v.detach().to("cpu", copy=True) for k, v in pipeline.state_dict().items()}
        return [
            ShardTask(
                pipeline_config=config, pipeline_state=state, training=pipeline.training,
                data=self.data_spec, frame_ids=shard, roots=tuple(roots), options=options,
                shard_index=i, n_shards=self.n_shards, fit_token=self.fit_token,
                torch_threads=self.torch_threads, device=self.device,
            )
            for i, shard in enumerate(self.shards)
        ]

    def __call__(self, pipeline: Pipeline, roots: list[str],
                 options: PassOptions) -> dict[str, MomentState]:
        """Run one pass sharded; returns the globally merged state at every root."""
        t0 = time.perf_counter()
        tasks = self.tasks(pipeline, roots, options)
        results = list(self.map_fn(run_shard, tasks))
        if len(results) != len(tasks):
            raise PipelineError(
                f"map_fn returned {len(results)} results for {len(tasks)} shard tasks; it must "
                "return one result per item, in order"
            )
        results.sort(key=lambda r: int(r["shard_index"]))
        merged = {
            root: merge_all([MomentState.from_dict(r["moments"][root]) for r in results])
            for root in roots
        }
        self.passes.append(PassRecord(
            roots=list(roots), shards=list(self.shards), seconds=time.perf_counter() - t0,
            results=[{k: v for k, v in r.items() if k != "moments"} for r in results],
        ))
        return merged

    def close(self) -> None:
        """Release the frames kept for this fit (in this process; see :mod:`tasks.sharding`)."""
        if self.fit_token is not None:
            release_shard_cache(self.fit_token)

    def __enter__(self) -> ShardedPassRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
