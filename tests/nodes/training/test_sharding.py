"""Sharded Phase 1 (nodes/training/sharding.py): merged shard statistics equal the single-process
ones."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from nodes import (
    ConfigError,
    DataValidationError,
    Pipeline,
    PipelineError,
    StatisticalTrainer,
)
from nodes.data import CubeDataModule
from nodes.training.sharding import (
    ShardDataSpec,
    ShardedPassRunner,
    rebuild_pipeline,
    release_shard_cache,
    run_shard,
    serial_map,
    split_frames,
)
from nodes.training.statistical_trainer import PassOptions, accumulate_pass
from nodes.training.stats import MomentState
from tests.sharding_helpers import chain, max_rel_diff, write_npz

N_FRAMES = 7
TOL = 1e-10


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory,
           cube_factory: Callable[..., Any]) -> list[Path]:
    data = cube_factory(N_FRAMES, seed=10, height=20, width=22, channels=12)
    return write_npz(tmp_path_factory.mktemp("npz"), data.cubes, data.masks)


def make_dm(paths: Sequence[Path], train_ids: Sequence[int], batch_size: int = 2) -> CubeDataModule:
    return CubeDataModule([str(p) for p in paths], list(train_ids), [0], [0],
                          batch_size=batch_size)


def fit(pipe: Pipeline, dm: Any, runner: Any = None, **kw: Any) -> Any:
    torch.manual_seed(0)
    return StatisticalTrainer(pipe, dm, shard_runner=runner, **kw).fit()


# ---------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("n_frames", [1, 5, 7, 12])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 7, 20])
def test_split_frames_is_contiguous_balanced_and_complete(n_frames: int, n_shards: int) -> None:
    ids = list(range(100, 100 + n_frames))
    shards = split_frames(ids, n_shards)
    assert len(shards) == min(n_frames, n_shards)
    assert [f for s in shards for f in s] == ids
    sizes = [len(s) for s in shards]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_split_frames_rejects_a_bad_shard_count(bad: Any) -> None:
    with pytest.raises(ConfigError, match="n_shards"):
        split_frames([0, 1], bad)


# ---------------------------------------------------------------------------- exactness
OPTIONS: dict[str, dict[str, Any]] = {
    "all_pixels": {},
    "normal_only": {"normal_only": True},
    "sampled": {"normal_only": True, "sample_fraction": 0.3, "seed": 7},
}


@functools.cache
def reference(frames: tuple[Path, ...], opts: str) -> tuple[Pipeline, Any]:
    """The single-process fit over all frames (computed once per option set)."""
    pipe = chain()
    return pipe, fit(pipe, make_dm(frames, range(N_FRAMES)), **OPTIONS[opts])


@pytest.mark.parametrize("n_shards", range(1, N_FRAMES + 1))
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_sharded_two_pass_fit_equals_single_process(
    frames: list[Path], n_shards: int, opts: str
) -> None:
    ids = list(range(N_FRAMES))
    single_pipe, single = reference(tuple(frames), opts)
    sharded_pipe = chain()
    spec = ShardDataSpec(tuple(str(p) for p in frames), tuple(ids), batch_size=2)
    with ShardedPassRunner(serial_map, spec, n_shards) as runner:
        sharded = fit(sharded_pipe, None, runner, **OPTIONS[opts])
    assert sharded.passes == single.passes == 2
    assert sharded.fitted == single.fitted == ["norm", "sel", "rx", "head"]
    assert set(sharded.root_moments) == set(single.root_moments) == {"data.cube", "rx.scores"}
    for root, state in single.root_moments.items():
        assert sharded.root_moments[root].count == state.count
        assert max_rel_diff(sharded.root_moments[root], state) <= TOL, root
    # Every pass ran as n_shards shard tasks over the pipeline as fitted so far.
    assert [p.roots for p in runner.passes] == [["data.cube"], ["rx.scores"]]
    assert all(len(p.results) == n_shards for p in runner.passes)
    # The fitted buffers follow from the same statistics.
    for key, value in single_pipe.state_dict().items():
        other = sharded_pipe.state_dict()[key]
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-9, equal_nan=True)
        else:
            assert torch.equal(other, value), key


def test_subsampling_keeps_fewer_pixels_and_still_matches(frames: list[Path]) -> None:
    ids = [1, 2, 4, 6]
    full = fit(chain(head=False), make_dm(frames, ids))
    single = fit(chain(head=False), make_dm(frames, ids), sample_fraction=0.25, seed=3)
    spec = ShardDataSpec(tuple(str(p) for p in frames), tuple(ids))
    runner = ShardedPassRunner(serial_map, spec, 3)
    sharded = fit(chain(head=False), None, runner, sample_fraction=0.25, seed=3)
    assert single.pixels < 0.4 * full.pixels
    assert sharded.pixels == single.pixels
    assert max_rel_diff(sharded.root_moments["data.cube"], single.root_moments["data.cube"]) <= TOL


def test_runner_contract_against_accumulate_pass(frames: list[Path]) -> None:
    """runner(pipeline, roots, options) is accumulate_pass over all training frames, merged."""
    ids = [0, 2, 3, 5, 6]
    pipe = chain()
    fit(pipe, make_dm(frames, ids))  # fitted: the second pass's root is now computable
    options = PassOptions(normal_only=True)
    roots = ["data.cube", "norm.normalized", "rx.scores"]
    dm = make_dm(frames, ids)
    dm.setup("fit")
    expected = accumulate_pass(pipe, dm.train_dataloader(), roots, options)
    runner = ShardedPassRunner(serial_map, ShardDataSpec.from_datamodule(dm), 4)
    got = runner(pipe, roots, options)
    for root in roots:
        assert got[root].count == expected[root].count
        assert max_rel_diff(got[root], expected[root]) <= TOL, root


def test_a_lost_shard_is_caught_by_the_comparison(frames: list[Path]) -> None:
    """The equality above is not vacuous: dropping one shard's frames changes the statistics."""
    ids = list(range(N_FRAMES))
    single = fit(chain(head=False), make_dm(frames, ids))

    def lossy_map(func: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        out = [func(x) for x in items]
        out[-1]["moments"] = {k: MomentState.empty(v["mean"].shape[0]).to_dict()
                              for k, v in out[-1]["moments"].items()}
        return out

    spec = ShardDataSpec(tuple(str(p) for p in frames), tuple(ids))
    runner = ShardedPassRunner(lossy_map, spec, 3)
    sharded = fit(chain(head=False), None, runner)
    assert sharded.pixels < single.pixels
    assert max_rel_diff(sharded.root_moments["data.cube"], single.root_moments["data.cube"]) > 1e-6


# ---------------------------------------------------------------------------- real scenes
def test_sharded_fit_on_the_bundled_session_equals_single_process(
    session_paths: list[Path],
) -> None:
    from nodes.library.presets import build_channel_selector_pipeline

    ids = [0, 1, 2]
    single_pipe = build_channel_selector_pipeline(input_channels=205)
    single = fit(single_pipe, make_dm(session_paths, ids, batch_size=1), normal_only=True)
    pipe = build_channel_selector_pipeline(input_channels=205)
    spec = ShardDataSpec(tuple(str(p) for p in session_paths), tuple(ids), expected_channels=205)
    with ShardedPassRunner(serial_map, spec, 3) as runner:
        sharded = fit(pipe, None, runner, normal_only=True)
    assert sharded.passes == 2
    for root, state in single.root_moments.items():
        assert max_rel_diff(sharded.root_moments[root], state) <= TOL, root
    assert single.pixels == 3 * 100 * 100 - (144 + 87 + 170)  # labelled anomalies left out


# ---------------------------------------------------------------------------- worker details
def test_later_passes_reuse_the_frames_a_worker_read(frames: list[Path]) -> None:
    spec = ShardDataSpec(tuple(str(p) for p in frames), (0, 1, 2, 3))
    with ShardedPassRunner(serial_map, spec, 2) as runner:
        fit(chain(), None, runner)
    assert [r["reused_frames"] for r in runner.passes[0].results] == [False, False]
    assert [r["reused_frames"] for r in runner.passes[1].results] == [True, True]
    assert release_shard_cache(runner.fit_token) == 0  # closed: nothing left behind
    fresh = ShardedPassRunner(serial_map, spec, 2, reuse_frames=False)
    fit(chain(), None, fresh)
    assert not any(r["reused_frames"] for p in fresh.passes for r in p.results)


def test_shard_task_and_result_survive_pickling(frames: list[Path]) -> None:
    import pickle

    pipe = chain()
    fit(pipe, make_dm(frames, [0, 1]))
    spec = ShardDataSpec(tuple(str(p) for p in frames), (0, 1, 2))
    runner = ShardedPassRunner(serial_map, spec, 2, reuse_frames=False)
    task = pickle.loads(pickle.dumps(runner.tasks(pipe, ["rx.scores"], PassOptions())[1]))
    assert task.frame_ids == (2,) and task.shard_index == 1 and task.n_shards == 2
    result = pickle.loads(pickle.dumps(run_shard(task)))
    assert result["frame_ids"] == [2]
    assert result["pixels"] == 20 * 22
    assert MomentState.from_dict(result["moments"]["rx.scores"]).count == 20 * 22


def test_rebuilt_pipeline_keeps_the_senders_dtypes_and_values(frames: list[Path]) -> None:
    pipe = chain().double()
    fit(pipe, make_dm(frames, [0, 1, 2]))
    state = {k: v.clone() for k, v in pipe.state_dict().items()}
    rebuilt = rebuild_pipeline(pipe.to_config(), state, training=False)
    assert not rebuilt.training
    for key, value in state.items():
        assert rebuilt.state_dict()[key].dtype == value.dtype, key
    torch.testing.assert_close(rebuilt.state_dict(), state, rtol=0, atol=0, equal_nan=True)


def test_a_missing_frame_file_fails_in_the_worker_with_its_name(tmp_path: Path,
                                                                 frames: list[Path]) -> None:
    gone = tmp_path / "gone.npz"
    spec = ShardDataSpec((str(frames[0]), str(gone)), (0, 1))
    with pytest.raises(DataValidationError, match=r"gone\.npz"):
        fit(chain(head=False), None, ShardedPassRunner(serial_map, spec, 2))


def test_in_memory_frames_cannot_be_sharded(cube_factory: Callable[..., Any]) -> None:
    data = cube_factory(3, seed=0)
    dm = CubeDataModule.from_arrays(data.cubes, data.masks, [0, 1], [2], [2], batch_size=1)
    with pytest.raises(ConfigError, match=r"\.npz"):
        ShardedPassRunner(serial_map, dm, 2)
    with pytest.raises(ConfigError, match="frame files"):
        ShardedPassRunner(serial_map, object(), 2)


def test_spec_validation_and_absolute_paths(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    spec = ShardDataSpec(("a.npz",), (0,), annotation_path="ann.json")
    assert spec.paths == (str(tmp_path / "a.npz"),)
    assert spec.annotation_path == str(tmp_path / "ann.json")
    with pytest.raises(DataValidationError, match="no training frames"):
        ShardDataSpec(("a.npz",), ())
    with pytest.raises(DataValidationError, match="more than once"):
        ShardDataSpec(("a.npz",), (0, 0))
    with pytest.raises(ConfigError, match="paths is empty"):
        ShardDataSpec((), (0,))


def test_a_map_fn_that_loses_results_is_an_error(frames: list[Path]) -> None:
    runner = ShardedPassRunner(lambda f, items: [f(x) for x in items][:-1],
                               ShardDataSpec(tuple(str(p) for p in frames), (0, 1, 2)), 3)
    with pytest.raises(PipelineError, match="2 results for 3 shard tasks"):
        fit(chain(head=False), None, runner)
