"""Sharded Phase 1 on a real local Dask cluster through Prefect's DaskTaskRunner.

Covers tasks/sharding.py.

(Named ``test_sharding_dask.py``, not ``test_sharding.py``: pytest's default import mode cannot
collect two test modules of one basename, and ``tests/nodes/training/test_sharding.py`` exists.)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from nodes import (
    ConfigError,
    DataValidationError,
    StatisticalTrainer,
)
from nodes.data import CubeDataModule
from nodes.training.sharding import ShardDataSpec, ShardedPassRunner
from nodes.training.stats import MomentState
from tasks.env import WORKER_MALLOPT, disable_telemetry
from tasks.sharding import (
    OrchestratedShardRunner,
    ShardingConfig,
    TaskRunnerMap,
    _prefect_task,
    _shard_key,
    dask_task_runner,
    make_shard_runner,
    shard_runner_scope,
    task_run_context,
    tune_allocator,
)
from tests.sharding_helpers import chain, max_rel_diff, write_npz

disable_telemetry()

N_FRAMES = 7
TOL = 1e-10


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory,
           cube_factory: Callable[..., Any]) -> list[Path]:
    data = cube_factory(N_FRAMES, seed=20, height=20, width=22, channels=12)
    return write_npz(tmp_path_factory.mktemp("npz"), data.cubes, data.masks)


def spec_of(frames: Sequence[Path], ids: Sequence[int]) -> ShardDataSpec:
    return ShardDataSpec(tuple(str(p) for p in frames), tuple(ids), batch_size=2)


def fit(dm: Any, runner: Any = None, **kw: Any) -> Any:
    torch.manual_seed(0)
    return StatisticalTrainer(chain(), dm, shard_runner=runner, **kw).fit()


def single(frames: Sequence[Path], ids: Sequence[int], **kw: Any) -> Any:
    dm = CubeDataModule([str(p) for p in frames], list(ids), [0], [0], batch_size=2)
    return fit(dm, **kw)


def assert_same_statistics(sharded: Any, reference: Any) -> None:
    assert sharded.passes == reference.passes == 2
    assert set(sharded.root_moments) == set(reference.root_moments) == {"data.cube", "rx.scores"}
    for root, state in reference.root_moments.items():
        assert sharded.root_moments[root].count == state.count, root
        assert max_rel_diff(sharded.root_moments[root], state) <= TOL, root


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """Prefect's temporary test database and API server for this module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def dask_map(prefect_api: None) -> Iterator[TaskRunnerMap]:
    """One LocalCluster of 2 single-thread worker processes, shared by the tests below."""
    task_map = TaskRunnerMap(lambda url: dask_task_runner(None, 2, url), kind="dask",
                             affinity=_shard_key, tune_workers=True)
    try:
        yield task_map
    finally:
        task_map.close()


# ---------------------------------------------------------------------------- real cluster
#: What the flow below shards (module level: workers unpickle the flow by reference).
_FLOW_INPUT: dict[str, Any] = {}


def _phase1_in_task() -> dict[str, Any]:
    """What ``fit_statistics`` does: make the runner from the params section, fit, close."""
    cfg, spec, opts = _FLOW_INPUT["cfg"], _FLOW_INPUT["spec"], _FLOW_INPUT["opts"]
    with shard_runner_scope(cfg, spec, n_workers=2) as runner:
        assert isinstance(runner, OrchestratedShardRunner)
        report = fit(None, runner, **opts)
        started = runner.map_fn.started
    return {"moments": {k: v.to_dict() for k, v in report.root_moments.items()},
            "passes": [p.results for p in runner.passes],
            "started": started, "stopped": not runner.map_fn.started}


def _train_flow() -> dict[str, Any]:
    from prefect import task

    return task(name="fit_statistics")(_phase1_in_task)()


@pytest.mark.slow
def test_fit_statistics_style_sharding_in_a_flow_equals_single_process(
    prefect_api: None, frames: list[Path]
) -> None:
    """A flow's task makes the runner from ``phase1.sharding``; a LocalCluster of 2 workers
    starts inside it, serves both passes and stops with the fit."""
    from prefect import flow

    ids = list(range(N_FRAMES))
    opts = {"normal_only": True, "sample_fraction": 0.5, "seed": 11}
    _FLOW_INPUT.update(cfg=ShardingConfig(runner="dask", address=None, n_shards=3),
                       spec=spec_of(frames, ids), opts=opts)
    try:
        out = flow(name="train")(_train_flow)()
    finally:
        _FLOW_INPUT.clear()
    assert out["started"] and out["stopped"]
    reference = single(frames, ids, **opts)
    sharded = {k: MomentState.from_dict(v) for k, v in out["moments"].items()}
    assert set(sharded) == set(reference.root_moments) == {"data.cube", "rx.scores"}
    for root, state in reference.root_moments.items():
        assert sharded[root].count == state.count, root
        assert max_rel_diff(sharded[root], state) <= TOL, root
    first, second = out["passes"]
    # Two worker processes of one thread each shared the 3 shards...
    assert len({r["worker"] for r in first}) == 2
    assert {r["torch_threads"] for r in first} == {1}
    assert all(r["dask_worker"].startswith("tcp://127.0.0.1:") for r in first)
    # ... and each shard's second pass went back to the worker that kept its frames.
    assert [r["dask_worker"] for r in second] == [r["dask_worker"] for r in first]
    assert all(r["reused_frames"] for r in second)


@pytest.mark.slow
@pytest.mark.parametrize("n_shards", [1, 2, 5, 7])
def test_any_shard_count_on_two_dask_workers_equals_single_process(
    dask_map: TaskRunnerMap, frames: list[Path], n_shards: int
) -> None:
    ids = [6, 0, 5, 1, 4, 2, 3]
    reference = single(frames, ids)
    with ShardedPassRunner(dask_map, spec_of(frames, ids), n_shards, torch_threads=1) as runner:
        sharded = fit(None, runner)
    assert_same_statistics(sharded, reference)
    assert all(len(p.results) == n_shards for p in runner.passes)


@pytest.mark.slow
def test_a_running_scheduler_is_used_by_address(dask_map: TaskRunnerMap,
                                                frames: list[Path]) -> None:
    """``phase1.sharding.address``: connect to a running scheduler, leave it running."""
    address = dask_map.start().client.scheduler.address
    ids = list(range(N_FRAMES))
    cfg = ShardingConfig(runner="dask", address=address, n_shards=4)
    with shard_runner_scope(cfg, spec_of(frames, ids)) as runner:
        assert runner is not None
        sharded = fit(None, runner)
    assert_same_statistics(sharded, single(frames, ids))
    assert {r["dask_worker"] for r in runner.passes[0].results} <= set(
        dask_map.start().client.scheduler_info()["workers"])
    assert dask_map.started  # closing the runner did not stop the cluster it connected to


@pytest.mark.slow
def test_a_worker_error_reaches_the_driver_with_its_message(
    dask_map: TaskRunnerMap, frames: list[Path], tmp_path: Path
) -> None:
    spec = ShardDataSpec((str(frames[0]), str(tmp_path / "missing.npz")), (0, 1))
    with pytest.raises(DataValidationError, match=r"missing\.npz"):
        fit(None, ShardedPassRunner(dask_map, spec, 2))


@pytest.mark.slow
def test_the_task_map_runs_any_function_as_prefect_tasks(dask_map: TaskRunnerMap) -> None:
    assert dask_map(abs, [-3, 2, -1]) == [3, 2, 1]


def _worker_env() -> dict[str, str | None]:
    import os

    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
            "DO_NOT_TRACK", "PREFECT_API_URL")
    return {k: os.environ.get(k) for k in keys}


@pytest.mark.slow
def test_local_workers_run_one_thread_without_telemetry(dask_map: TaskRunnerMap) -> None:
    envs = dask_map.start().client.run(_worker_env)
    assert len(envs) == 2
    for env in envs.values():
        threads = {env[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        assert threads == {"1"}
        assert env["MALLOC_TRIM_THRESHOLD_"] is None  # glibc's adaptive defaults, as the driver
        assert env["DO_NOT_TRACK"] == "true"
        assert (env["PREFECT_API_URL"] or "").startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_local_workers_tune_their_allocator(dask_map: TaskRunnerMap) -> None:
    dask_map.start()
    assert len(dask_map.worker_tuning) == 2
    for accepted in dask_map.worker_tuning.values():
        assert accepted == dict.fromkeys(WORKER_MALLOPT, True)


def test_make_shard_runner_tunes_only_the_workers_it_starts(frames: list[Path]) -> None:
    spec = spec_of(frames, [0, 1])
    local = make_shard_runner({"runner": "dask", "n_shards": 2}, spec)
    remote = make_shard_runner({"runner": "dask", "n_shards": 2,
                                "address": "tcp://127.0.0.1:8786"}, spec)
    assert local is not None and remote is not None
    assert local.map_fn.tune_workers and not remote.map_fn.tune_workers
    assert not local.map_fn.started and not remote.map_fn.started


_TUNE_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tasks.env import tune_allocator
print(json.dumps(tune_allocator()))
"""


@pytest.mark.skipif(not Path("/lib/x86_64-linux-gnu/libc.so.6").exists()
                    and not Path("/lib64/libc.so.6").exists(), reason="needs glibc")
def test_tune_allocator_is_accepted_by_glibc() -> None:
    """In a child: mallopt settings stay with the process that makes them."""
    import json
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", _TUNE_CHILD, repo], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == dict.fromkeys(WORKER_MALLOPT, True)
    assert callable(tune_allocator)


def _context_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    """(Prefect's serialize_context, task_run_context) for the same task run, in a task."""
    from uuid import uuid4

    from prefect.context import serialize_context

    ptask = _prefect_task(abs)
    run_id = uuid4()
    deps: dict[str, set[Any]] = {"payload": set()}
    theirs = serialize_context(asset_ctx_kwargs={
        "task": ptask, "task_run_id": run_id, "task_inputs": deps, "copy_to_child_ctx": True})
    return theirs, task_run_context(ptask, run_id, deps)


@pytest.mark.slow
def test_task_run_context_is_prefects_less_the_settings(prefect_api: None) -> None:
    """Shards submitted inside a flow's task carry the flow's and the parent task's context."""
    from prefect import flow, task

    theirs, ours = flow(name="ctx")(lambda: task(name="parent")(_context_pair)())()
    assert theirs["flow_run_context"] and theirs["task_run_context"]  # inside a flow's task
    assert theirs["settings_context"] and ours["settings_context"] == {}
    assert set(ours) == set(theirs)
    for key in theirs:
        if key != "settings_context":
            assert ours[key] == theirs[key], key


@pytest.mark.slow
def test_settings_are_serialized_once_per_settings_object(dask_map: TaskRunnerMap) -> None:
    from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

    dask_map.start()
    with dask_map._settings_scope():
        token, payload = dask_map._serialized_settings()
        assert dask_map._serialized_settings()[0] == token
        assert payload["settings"]["api"]["url"] == dask_map._api_url
        with temporary_settings(updates={PREFECT_LOGGING_LEVEL: "ERROR"}):
            changed, new = dask_map._serialized_settings()
    assert changed != token
    assert new["settings"]["logging"]["level"] == "ERROR"
    # ... and the workers run their task runs under the driver's settings of the moment.
    with temporary_settings(updates={PREFECT_LOGGING_LEVEL: "ERROR"}):
        assert dask_map(_logging_level, [0, 1]) == ["ERROR", "ERROR"]
    assert dask_map(_logging_level, [0]) != ["ERROR"]


def _logging_level(_: int) -> str:
    from prefect.settings import PREFECT_LOGGING_LEVEL

    return str(PREFECT_LOGGING_LEVEL.value())


# ---------------------------------------------------------------------------- configuration
def test_inprocess_is_the_default_and_starts_nothing(frames: list[Path]) -> None:
    assert make_shard_runner(None, spec_of(frames, [0])) is None
    assert make_shard_runner(ShardingConfig(), spec_of(frames, [0])) is None
    assert make_shard_runner({"runner": "inprocess", "n_shards": 4}, spec_of(frames, [0])) is None


def test_params_section_is_read_and_nothing_starts_before_the_first_pass(
    frames: list[Path],
) -> None:
    dm = CubeDataModule([str(p) for p in frames], [0, 1, 2, 3], [4], [5], batch_size=3)
    runner = make_shard_runner(ShardingConfig(runner="dask", n_shards=3), dm)
    assert isinstance(runner, OrchestratedShardRunner)
    assert not runner.map_fn.started
    assert runner.shards == [(0, 1), (2,), (3,)]
    assert runner.data_spec.batch_size == 3
    assert runner.torch_threads == 1  # local workers: one thread each
    runner.close()
    remote = make_shard_runner({"runner": "dask", "address": "tcp://10.0.0.5:8786",
                                "n_shards": 2}, dm)
    assert remote is not None and remote.torch_threads is None  # the cluster's own setting
    remote.close()


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"runner": "spark"}, r"runner: .*'inprocess', 'dask' or 'ray' \(got 'spark'\)"),
        ({"runner": "dask", "n_shards": 0}, r"n_shards: .*greater than or equal to 1 \(got 0\)"),
        ({"runner": "dask", "n_workers": -2}, r"n_workers: .* \(got -2\)"),
    ],
)
def test_bad_sharding_config_names_the_field(cfg: dict[str, Any], match: str,
                                             frames: list[Path]) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        make_shard_runner(cfg, spec_of(frames, [0]))
    assert "params.yaml (section 'phase1.sharding')" in str(err.value)


def test_in_memory_frames_are_refused(cube_factory: Callable[..., Any]) -> None:
    data = cube_factory(3, seed=0)
    dm = CubeDataModule.from_arrays(data.cubes, data.masks, [0, 1], [2], [2], batch_size=1)
    with pytest.raises(ConfigError, match=r"\.npz"):
        make_shard_runner({"runner": "dask", "n_shards": 2}, dm)


@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is not None,
                    reason="prefect-ray is installed here")
def test_ray_without_prefect_ray_is_a_clear_error(frames: list[Path]) -> None:
    with pytest.raises(ConfigError, match="prefect-ray, which is not installed") as err:
        make_shard_runner({"runner": "ray", "address": "ray://head:10001", "n_shards": 2},
                          spec_of(frames, [0, 1]))
    assert "docs/scaling.md" in str(err.value)


def test_ray_never_starts_a_local_instance(monkeypatch: pytest.MonkeyPatch,
                                           frames: list[Path]) -> None:
    """Even with prefect-ray importable, no address means no Ray (checked before any import)."""
    real = importlib.util.find_spec

    def pretend(name: str, *args: Any) -> Any:
        return object() if name == "prefect_ray" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", pretend)
    with pytest.raises(ConfigError, match="does not start a local Ray"):
        make_shard_runner({"runner": "ray", "n_shards": 2}, spec_of(frames, [0, 1]))


def test_sharding_config_reads_mappings_and_objects() -> None:
    assert ShardingConfig.from_any({"runner": "dask", "n_shards": 4}) == ShardingConfig(
        runner="dask", n_shards=4)
    assert ShardingConfig.from_any(ShardingConfig(runner="dask", address="127.0.0.1:8786",
                                                  n_shards=2)).address == "127.0.0.1:8786"
