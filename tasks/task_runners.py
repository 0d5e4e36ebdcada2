"""Where the shards of Phase 1 run: ``phase1.sharding`` and the Prefect task runners.

:class:`ShardingConfig` is the validated ``params.yaml`` section; :func:`dask_task_runner` and
:func:`ray_task_runner` build the Prefect task runners of :mod:`tasks.sharding` (a loopback Dask
LocalCluster of single-threaded workers, or a running cluster at ``address``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from nodes.errors import ConfigError
from nodes.training.config import ConfigModel
from tasks.env import TELEMETRY_ENV

__all__ = ["SINGLE_THREAD_ENV", "ShardingConfig", "dask_task_runner", "ray_task_runner"]

_FIELD = "params.yaml phase1.sharding"

#: Worker processes run one thread each: numpy/scipy BLAS and torch's OpenMP pool read these
#: when they load, so they go into the worker's environment before it imports anything.
SINGLE_THREAD_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}

class ShardingConfig(ConfigModel):
    """Where Phase 1 runs (``params.yaml`` ``phase1.sharding``).

    Attributes:
        runner: ``inprocess``, ``dask`` or ``ray``.
        address: Scheduler address of a running cluster (Dask ``tcp://host:8786``, Ray
            ``ray://host:10001``); None starts a local Dask cluster (never a local Ray).
        n_shards: Shards per pass (at most one per training frame).
        n_workers: Worker processes of the local Dask cluster (default ``min(n_shards, CPUs)``).
    """

    runner: Literal["inprocess", "dask", "ray"] = "inprocess"
    address: Annotated[str, Field(min_length=1)] | None = None
    n_shards: Annotated[int, Field(ge=1, strict=True)] = 1
    n_workers: Annotated[int, Field(ge=1, strict=True)] | None = None

    @classmethod
    def from_any(cls, cfg: Any) -> ShardingConfig:
        """Read a config from a mapping, an object with the same attributes, or None.

        Raises:
            ConfigError: Unknown runner, or a non-positive shard/worker count (the message
                names ``params.yaml phase1.sharding``).
        """
        if cfg is None:
            return cls()
        if isinstance(cfg, ShardingConfig):
            return cfg
        if isinstance(cfg, Mapping):
            data = dict(cfg)
        elif isinstance(cfg, BaseModel):
            data = cfg.model_dump()
        else:
            data = {key: getattr(cfg, key) for key in cls.model_fields if hasattr(cfg, key)}
        return cls.from_dict(data, source="params.yaml", section="phase1.sharding")


def worker_api_url() -> str:
    """The Prefect API shard workers report to: the configured one, else the driver's own.

    Without ``PREFECT_API_URL`` every process would start its own temporary API server (seconds
    each); asking for a client starts the driver's (once per process) and gives its URL.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def _worker_env() -> dict[str, str]:
    """Environment of worker processes: telemetry off, one BLAS/OpenMP thread."""
    # Shards run outside a flow when Phase 1 is called directly (tests, benchmarks); Prefect
    # then warns on every log record that it cannot send it to the API.
    quiet = os.environ.get("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    return {**TELEMETRY_ENV, **SINGLE_THREAD_ENV,
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": quiet}


def dask_task_runner(address: str | None, n_workers: int, api_url: str) -> Any:
    """A ``prefect_dask.DaskTaskRunner``: on ``address``, else on a new loopback LocalCluster.

    The local cluster has ``n_workers`` processes of one thread each, listens on 127.0.0.1
    only, has no dashboard, and passes the telemetry switches, single-thread BLAS and the API
    URL to its workers' environment.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    env = {**_worker_env(), "PREFECT_API_URL": api_url}
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            "env": env,
        },
    )


def ray_task_runner(address: str | None, api_url: str) -> Any:
    """A ``prefect_ray.RayTaskRunner`` connected to the running Ray cluster at ``address``.

    Raises:
        ConfigError: prefect-ray is not installed, or no address is given (cubeline does not
            start a local Ray instance).
    """
    check_ray(address)
    from prefect_ray import RayTaskRunner

    env = {**_worker_env(), "PREFECT_API_URL": api_url}
    return RayTaskRunner(address=address, init_kwargs={"runtime_env": {"env_vars": env}})


def check_ray(address: str | None) -> None:
    if importlib.util.find_spec("prefect_ray") is None:
        raise ConfigError(
            f"{_FIELD}.runner = 'ray' needs prefect-ray, which is not installed here (and Ray "
            "is not started on these machines: it probes cloud metadata addresses at start). "
            "Fix: use runner 'dask', or on a machine that runs a Ray cluster `pip install "
            "prefect-ray` and set address to it (see docs/scaling.md)."
        )
    if not address:
        raise ConfigError(
            f"{_FIELD}.runner = 'ray' needs {_FIELD}.address of a running Ray cluster (e.g. "
            "ray://head-node:10001); cubeline does not start a local Ray instance. Fix: start "
            "the cluster with `ray start --head` and set the address."
        )


def dask_worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):  # not inside a Dask worker
        return None
