"""Sharded Phase 1 on Prefect task runners: Dask (``prefect-dask``) here, Ray by configuration.

``params.yaml`` ``phase1.sharding`` picks where the passes of ``fit_statistics`` run:

- ``runner: inprocess`` (default): in the task's own process; :func:`make_shard_runner` returns
  None and :class:`~nodes.StatisticalTrainer` runs its passes itself.
- ``runner: dask``: one Prefect task per shard (``fit_statistics_shard``) on
  ``prefect_dask.DaskTaskRunner``. Without ``address`` a ``distributed.LocalCluster`` is started
  on 127.0.0.1 with ``min(n_shards, CPUs)`` worker processes of one thread each (BLAS/OpenMP
  threads pinned to 1, so workers do not oversubscribe the cores; glibc's allocator tuned by
  :func:`tasks.env.tune_allocator`) and torn down after the fit; with ``address`` (``tcp://host:8786``)
  the shards go to that running scheduler, whose workers are left as they are.
- ``runner: ray``: the same on ``prefect_ray.RayTaskRunner`` against the running Ray cluster at
  ``address``. prefect-ray is not a dependency, and cubeline never starts a local Ray instance
  (Ray probes cloud metadata addresses outside loopback at start).

The task runner starts on the first pass and serves every pass of the fit (a logit head behind
RX needs a second pass), so the cluster starts once per fit. Shard workers report their task
runs to the Prefect API of the driver: an explicit ``PREFECT_API_URL`` when set, else the
driver's temporary API server, whose URL is handed to the local workers (remote workers need a
server they can reach; see ``docs/scaling.md``). The numerics live in
:mod:`nodes.training.sharding`.

On Dask each shard is a Prefect task run as ``prefect_dask`` submits it (``run_task_sync`` in
the worker), except that the driver's settings are serialized once per settings object and
validated once per worker (:func:`run_prefect_task`) rather than once per task run
(``bench/sharded.py`` times the orchestration of a pass).

Why one module of about 400 lines: the shard task, its per-worker settings cache (a lock and
a token map) and the runner that submits to it share that state; the task runners and the
``phase1.sharding`` config live in :mod:`tasks.task_runners`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

from nodes.errors import CubelineError, TrainingError
from nodes.training.sharding import (
    ShardDataSpec,
    ShardedPassRunner,
    ShardTask,
    release_shard_cache,
    run_shard,
)
from tasks.env import tune_allocator
from tasks.task_runners import (
    ShardingConfig,
    check_ray,
    dask_task_runner,
    dask_worker_address,
    ray_task_runner,
    worker_api_url,
)

SHARD_TASK_NAME = "fit_statistics_shard"
#: Bump when a shard task's behaviour changes in a way its source cannot show.
SHARD_TASK_VERSION = "1"


def fit_statistics_shard(payload: bytes, shard_index: int = 0) -> dict[str, Any]:
    """One shard of a Phase-1 pass (:func:`~nodes.training.sharding.run_shard`) as a Prefect task.

    Args:
        payload: The pickled :class:`~nodes.training.sharding.ShardTask`. Bytes, because Prefect
        walks
            every dataclass, dict and tuple of a task's parameters on both sides looking for
            futures (frame ids, pipeline config...), and its ``quote`` wrapper does not survive
            pickling to a Dask worker (it comes back wrapped twice).
        shard_index: Only names the task run (``phase1-shard-<i>``).

    Returns:
        :func:`~nodes.training.sharding.run_shard`'s result, plus the Dask worker that ran it
        (``dask_worker``), so the next pass can send the shard back to the worker that keeps
        its frames.
    """
    shard = pickle.loads(payload)
    if not isinstance(shard, ShardTask):
        raise TrainingError(f"fit_statistics_shard got a {type(shard).__name__}, not a ShardTask")
    result = run_shard(shard)
    result["dask_worker"] = dask_worker_address()
    return result


def apply_payload(payload: bytes) -> Any:
    """Run ``func(item)`` from a cloudpickled ``(func, item)`` (any other ``map_fn`` use)."""
    func, item = pickle.loads(payload)
    return func(item)


def _prefect_task(func: Callable[[Any], Any]) -> Any:
    """The Prefect task that runs ``func`` on one item (never cached: inputs hold tensors)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    is_shard = func is run_shard
    return task(
        name=SHARD_TASK_NAME if is_shard else f"shard_{getattr(func, '__name__', 'func')}",
        version=SHARD_TASK_VERSION,
        cache_policy=NO_CACHE,
        persist_result=False,
        task_run_name="phase1-shard-{shard_index}" if is_shard else None,
    )(fit_statistics_shard if is_shard else apply_payload)


def _parameters(func: Callable[[Any], Any], item: Any) -> dict[str, Any]:
    import cloudpickle

    if func is run_shard and isinstance(item, ShardTask):
        return {"payload": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL),
                "shard_index": item.shard_index}
    return {"payload": cloudpickle.dumps((func, item), protocol=pickle.HIGHEST_PROTOCOL)}


#: Settings a Dask worker has hydrated, by the driver's token: ``token -> (profile, settings)``.
_WORKER_SETTINGS: dict[str, tuple[Any, Any]] = {}
_WORKER_SETTINGS_LOCK = threading.Lock()


def run_prefect_task(*, settings_token: str, settings: dict[str, Any],
                     **run_kwargs: Any) -> Any:
    """Run one Prefect task run on a Dask worker (``prefect.task_engine.run_task_sync``).

    What ``prefect_dask``'s client submits, less two per-task costs: validating the driver's
    serialized settings into a ``Settings`` model happens once per worker and settings version
    (``settings_token``), and the task run gets one API client instead of two (each builds an
    SSL context).
    The task run itself (states, events, result handling) is Prefect's, unchanged.

    Args:
        settings_token: Names ``settings``; equal tokens carry equal settings.
        settings: ``SettingsContext.serialize()`` of the driver (API URL included).
        **run_kwargs: ``run_task_sync``'s arguments (``context`` without settings).

    Returns:
        ``run_task_sync``'s result (the final state for ``return_type="state"``).
    """
    from prefect.context import SettingsContext, SyncClientContext
    from prefect.task_engine import run_task_sync

    with _WORKER_SETTINGS_LOCK:
        hydrated = _WORKER_SETTINGS.get(settings_token)
        if hydrated is None:
            ctx = SettingsContext(**settings)
            hydrated = (ctx.profile, ctx.settings)
            if len(_WORKER_SETTINGS) >= 8:  # drivers come and go; keep a few
                _WORKER_SETTINGS.pop(next(iter(_WORKER_SETTINGS)))
            _WORKER_SETTINGS[settings_token] = hydrated
    profile, worker_settings = hydrated
    with (SettingsContext(profile=profile, settings=worker_settings),
          SyncClientContext.get_or_create()):
        return run_task_sync(**run_kwargs)


def task_run_context(task: Any, task_run_id: Any,
                     dependencies: dict[str, set[Any]]) -> dict[str, Any]:
    """``prefect.context.serialize_context`` for one task run, without the settings.

    The settings travel separately (:func:`run_prefect_task`): serializing them is a large
    part of a task run's cost on the driver, and they do not change between the shards of a fit.
    """
    import prefect.context as pctx

    flow_ctx = pctx.EngineContext.get()
    task_ctx = pctx.TaskRunContext.get()
    tags_ctx = pctx.TagsContext.get()
    deployment_id = pctx._deployment_id.get()
    return {
        "flow_run_context": flow_ctx.serialize() if flow_ctx else {},
        "task_run_context": task_ctx.serialize() if task_ctx else {},
        "tags_context": tags_ctx.serialize() if tags_ctx else {},
        "settings_context": {},
        "asset_context": pctx.AssetContext.from_task_and_inputs(
            task=task, task_run_id=task_run_id, task_inputs=dependencies,
            copy_to_child_ctx=True,
        ).serialize(),
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": pctx._deployment_parameters.get(),
    }


class TaskRunnerMap:
    """``map_fn`` of :class:`~nodes.training.sharding.ShardedPassRunner`: one Prefect task per item.

    The task runner is started on the first call and kept until :meth:`close`, so every pass
    of a fit runs on the same cluster.

    On Dask, an item whose ``affinity(item)`` key was seen in an earlier call goes preferably
    to the worker that ran it then (``workers=[...]``, ``allow_other_workers=True``): a shard's
    second pass finds its frames still in that worker's memory.

    Args:
        make_runner: ``make_runner(api_url) -> TaskRunner`` (not started).
        kind: ``dask`` or ``ray`` (for messages and worker-side clean-up).
        affinity: ``affinity(item) -> key`` (None: no preference for that item).
        tune_workers: On Dask, run :func:`tune_allocator` in every worker once the cluster is
            up (for local clusters that cubeline starts; a worker the nanny restarts later
            runs untuned, which costs time only).
    """

    def __init__(self, make_runner: Callable[[str], Any], kind: str,
                 affinity: Callable[[Any], Hashable | None] | None = None, *,
                 tune_workers: bool = False) -> None:
        self._make_runner = make_runner
        self.kind = kind
        self._affinity = affinity
        self.tune_workers = tune_workers
        #: What :func:`tune_allocator` reported per worker (filled when the cluster starts).
        self.worker_tuning: dict[str, dict[str, bool]] = {}
        self._placement: dict[Hashable, str] = {}
        self._runner: Any = None
        self._api_url: str | None = None
        # (driver settings, the same with the workers' API URL) and (settings context, its
        # token and serialized form): built once per settings object, not once per task.
        self._api_settings: tuple[Any, Any] | None = None
        self._serialized: tuple[Any, str, dict[str, Any]] | None = None

    @property
    def started(self) -> bool:
        """Whether the task runner (and its cluster) is up."""
        return self._runner is not None

    def start(self) -> Any:
        """Start the task runner and, on Dask, its cluster (idempotent); returns the runner."""
        if self._runner is None:
            self._api_url = worker_api_url()
            runner = self._make_runner(self._api_url)
            runner.__enter__()
            try:
                if self.kind == "dask":
                    import dask

                    # distributed's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in new workers; glibc
                    # then drops its adaptive mmap threshold, so every frame-sized array is
                    # mapped and faulted in afresh (``bench/sharded.py`` shows the cost).
                    # Workers keep glibc's defaults instead.
                    unset = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
                    with dask.config.set(unset):
                        runner.client  # noqa: B018 -- creates the (local) cluster now
                    if self.tune_workers:
                        self.worker_tuning = dict(runner.client.run(tune_allocator))
            except BaseException:
                runner.__exit__(None, None, None)
                raise
            self._runner = runner
        return self._runner

    def __call__(self, func: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Run ``func(item)`` as one Prefect task per item; results in item order."""
        runner = self.start()
        ptask = _prefect_task(func)
        keys = [self._affinity(item) if self._affinity else None for item in items]
        # The serialized settings travel with each task: workers report to the driver's API.
        with self._settings_scope():
            futures = [self._submit(runner, ptask, _parameters(func, item), key)
                       for item, key in zip(items, keys, strict=True)]
            results = []
            for i, future in enumerate(futures):
                try:
                    results.append(future.result())
                except CubelineError:
                    raise  # already names the file/field and the fix
                except Exception as exc:
                    raise TrainingError(
                        f"Phase 1 shard {i} of {len(items)} failed on the {self.kind} cluster: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
        for key, result in zip(keys, results, strict=True):
            worker = result.get("dask_worker") if isinstance(result, Mapping) else None
            if key is not None and worker:
                self._placement[key] = str(worker)
        return results

    def _settings_scope(self) -> contextlib.AbstractContextManager[Any]:
        """The driver's settings with ``PREFECT_API_URL`` = the workers' API.

        ``temporary_settings`` would rebuild the whole settings model on every call; the copy is
        made once per settings object of the driver instead.
        """
        from prefect.context import SettingsContext
        from prefect.settings import PREFECT_API_URL

        current = SettingsContext.get()
        if current is None or PREFECT_API_URL.value() == self._api_url:
            return contextlib.nullcontext()
        if self._api_settings is None or self._api_settings[0] is not current.settings:
            self._api_settings = (current.settings, current.settings.copy_with_update(
                updates={PREFECT_API_URL: self._api_url}))
        return SettingsContext(profile=current.profile, settings=self._api_settings[1])

    def _serialized_settings(self) -> tuple[str, dict[str, Any]]:
        """Token and ``serialize()`` of the current settings context (cached per context)."""
        from prefect.context import SettingsContext

        current = SettingsContext.get()
        cached = self._serialized
        if (cached is None or cached[0] is None or current is None
                or cached[0].settings is not current.settings
                or cached[0].profile is not current.profile):
            payload = current.serialize() if current is not None else {}
            cached = self._serialized = (current, uuid.uuid4().hex, payload)
        return cached[1], cached[2]

    def _submit(self, runner: Any, ptask: Any, parameters: dict[str, Any],
                key: Hashable | None) -> Any:
        if self.kind != "dask":
            return runner.submit(ptask, parameters=parameters)
        # What DaskTaskRunner.submit does, plus placement (a shard's second pass goes back to
        # the worker that keeps its frames) and with the settings serialized once per fit
        # instead of once per task (see run_prefect_task).
        import distributed
        from prefect.utilities.engine import collect_task_run_inputs_sync
        from prefect_dask.task_runners import PrefectDaskFuture

        worker = self._placement.get(key) if key is not None else None
        task_run_id = uuid.uuid4()
        dependencies = {k: collect_task_run_inputs_sync(v, future_cls=distributed.Future)
                        for k, v in parameters.items()}
        token, settings = self._serialized_settings()
        future = runner.client.submit(
            run_prefect_task,
            key=f"{ptask.name}-{task_run_id.hex}",
            workers=[worker] if worker else None,
            allow_other_workers=worker is not None,
            pure=False,
            settings_token=token,
            settings=settings,
            task=ptask,
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=None,
            return_type="state",
            dependencies=dependencies,
            context=task_run_context(ptask, task_run_id, dependencies),
        )
        return PrefectDaskFuture(wrapped_future=future, task_run_id=task_run_id)

    def run_on_workers(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` once on every Dask worker (no-op for other runners)."""
        if self._runner is None or self.kind != "dask":
            return
        self._runner.client.run(fn, *args)

    def close(self) -> None:
        """Stop the task runner (a local cluster shuts down; a remote one stays up)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.__exit__(None, None, None)


class OrchestratedShardRunner(ShardedPassRunner):
    """:class:`~nodes.training.sharding.ShardedPassRunner` on a :class:`TaskRunnerMap`.

    :meth:`close` makes remote workers drop the frames they kept for this fit, then stops the
    task runner (and a local cluster with it).
    """

    map_fn: TaskRunnerMap

    def __init__(self, task_map: TaskRunnerMap, data_spec: ShardDataSpec | Any, n_shards: int,
                 **kwargs: Any) -> None:
        super().__init__(task_map, data_spec, n_shards, **kwargs)

    def close(self) -> None:
        """Release worker-side frames and stop the task runner."""
        try:
            if self.fit_token is not None and self.map_fn.started:
                with contextlib.suppress(Exception):  # clean-up must not mask the fit's error
                    self.map_fn.run_on_workers(release_shard_cache, self.fit_token)
        finally:
            super().close()
            self.map_fn.close()


def _shard_key(item: Any) -> Hashable | None:
    if isinstance(item, ShardTask) and item.fit_token is not None:
        return (item.fit_token, item.frame_ids)
    return None


def make_shard_runner(sharding_cfg: Any, data_cfg: ShardDataSpec | Any, *,
                      n_workers: int | None = None) -> OrchestratedShardRunner | None:
    """The Phase-1 shard runner that ``params.yaml`` ``phase1.sharding`` asks for.

    Nothing starts here: the cluster comes up on the first pass. Close the runner when the fit
    is done (or use :func:`shard_runner_scope`).

    Args:
        sharding_cfg: ``phase1.sharding`` (``ShardingConfig``, a mapping or
            :class:`ShardingConfig`).
        data_cfg: The training frames: a :class:`~nodes.training.sharding.ShardDataSpec` or the
            file-backed ``CubeDataModule`` of the fit.
        n_workers: Override the local Dask cluster's worker count.

    Returns:
        None for ``runner: inprocess`` (the trainer's own loop), else the runner.

    Raises:
        ConfigError: Unknown runner, bad counts, ``ray`` without prefect-ray or an address, or
            data that cannot be sent to workers (in-memory frames).
    """
    cfg = ShardingConfig.from_any(sharding_cfg)
    if cfg.runner == "inprocess":
        return None
    spec = data_cfg if isinstance(data_cfg, ShardDataSpec) else ShardDataSpec.from_datamodule(
        data_cfg)
    workers = n_workers or cfg.n_workers or max(1, min(cfg.n_shards, os.cpu_count() or 1))
    if cfg.runner == "ray":
        check_ray(cfg.address)  # fail now, not at the first pass
        address = cfg.address
        task_map = TaskRunnerMap(lambda url: ray_task_runner(address, url), kind="ray")
    else:
        address = cfg.address
        task_map = TaskRunnerMap(lambda url: dask_task_runner(address, workers, url),
                                 kind="dask", affinity=_shard_key, tune_workers=not address)
    # Local workers have one thread each; on a remote cluster the workers' own setting stands.
    threads = 1 if cfg.runner == "dask" and not cfg.address else None
    return OrchestratedShardRunner(task_map, spec, cfg.n_shards, torch_threads=threads)


@contextlib.contextmanager
def shard_runner_scope(sharding_cfg: Any, data_cfg: ShardDataSpec | Any, *,
                       n_workers: int | None = None) -> Iterator[OrchestratedShardRunner | None]:
    """:func:`make_shard_runner` as a context manager that closes the runner on exit."""
    runner = make_shard_runner(sharding_cfg, data_cfg, n_workers=n_workers)
    try:
        yield runner
    finally:
        if runner is not None:
            runner.close()
