"""Faults below the CLI: files the model layer reads, degenerate statistics, the gate's floors,
hostile cache entries, and how every exception becomes one line and an exit code."""

from __future__ import annotations

import errno
import math
import pickle
import sqlite3
from pathlib import Path

import pytest
import torch

from nodes.errors import ConfigError, CubelineError, DegenerateStatisticsError
from tasks.failures import EXIT_INTERNAL, exit_code, report, user_error


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodes.library.presets import build_channel_selector_pipeline

    pipe = build_channel_selector_pipeline(input_channels=12, n_select=3)
    cfg, _ = pipe.save_to_file(tmp_path_factory.mktemp("pipe") / "pipeline.yaml")
    return Path(cfg)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst / src.name


WEIGHTS = {
    "empty": b"",
    "garbage": b"\x00garbage" * 10,
    "pickle_payload": pickle.dumps(print),
    "truncated_zip": b"PK\x03\x04" + b"\x00" * 30,
}


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_bad_weights_file(saved_pipeline: Path, tmp_path: Path, case: str) -> None:
    from nodes.graph.pipeline import Pipeline

    cfg = _copy(saved_pipeline, tmp_path)
    cfg.with_suffix(".pt").write_bytes(WEIGHTS[case])
    with pytest.raises(ConfigError, match="weights file"):
        Pipeline.load_from_file(cfg)


PIPELINE_YAML = {
    "not_yaml": "nodes: [\n",
    "a_list": "- 1\n- 2\n",
    "a_number": "42\n",
    "empty": "",
    "nodes_not_list": "nodes: 5\nconnections: []\n",
    "unknown_node": "nodes:\n- {class: os.system, name: x}\nconnections: []\n",
    "python_tag": "!!python/object/apply:os.system ['true']\n",
}


@pytest.mark.parametrize("case", sorted(PIPELINE_YAML))
def test_bad_pipeline_yaml(saved_pipeline: Path, tmp_path: Path, case: str) -> None:
    from nodes.graph.pipeline import Pipeline

    cfg = _copy(saved_pipeline, tmp_path)
    cfg.write_text(PIPELINE_YAML[case])
    with pytest.raises(CubelineError):
        Pipeline.load_from_file(cfg)


def _moments(x: torch.Tensor) -> object:
    from nodes.training.stats import MomentAccumulator

    acc = MomentAccumulator(x.shape[1])
    acc.update(x.double())
    return acc.finalize()


def test_degenerate_statistics_refused_or_repaired() -> None:
    from tasks.steps.degenerate import check_statistics

    rng = torch.Generator().manual_seed(0)
    good = torch.randn(500, 6, generator=rng, dtype=torch.float64) * 3 + 100
    assert check_statistics(_moments(good), frames="f", policy="refuse", ridge=1e-3,
                            eps=1e-6) is None
    constant = good.clone()
    constant[:, 2] = 7.0
    duplicated = torch.cat([good, good[:, :1] * 2], dim=1)
    flat = torch.full((100, 6), 5.0, dtype=torch.float64)
    for x, needle in ((constant, "zero-variance"), (duplicated, "singular"), (flat, "zero")):
        with pytest.raises(DegenerateStatisticsError, match=needle):
            check_statistics(_moments(x), frames="f", policy="refuse", ridge=1e-3, eps=1e-6)
        eps = check_statistics(_moments(x), frames="f", policy="ridge", ridge=1e-3, eps=1e-6)
        assert eps is not None and eps > 1e-6 and math.isfinite(eps)
    nan = good.clone()
    nan[0, 0] = math.nan
    with pytest.raises(DegenerateStatisticsError, match="non-finite"):  # no ridge fixes NaN
        check_statistics(_moments(nan), frames="f", policy="ridge", ridge=1e-3, eps=1e-6)
    assert exit_code(DegenerateStatisticsError("x")) == 8


def test_gate_never_promotes_chance_or_infinite_threshold() -> None:
    from tasks.registry.gate import THRESHOLD_METRIC, decide_promotion

    gate = {"metric": "metrics_anomaly/ap", "mode": "max", "absolute_thresholds": {}}
    for metrics in (
        {"metrics_anomaly/ap": 0.9, "metrics_anomaly/auroc": 0.5},
        {"metrics_anomaly/ap": 0.9, "metrics_anomaly/auroc": math.nan},
        {"metrics_anomaly/ap": 0.9, "metrics_anomaly/auroc": 0.9, THRESHOLD_METRIC: math.inf},
        {"metrics_anomaly/ap": math.nan, "metrics_anomaly/auroc": 0.9},
    ):
        assert not decide_promotion(metrics, None, gate, challenger_split_id="s").promote


def test_planted_pickle_in_step_cache_never_runs(tmp_path: Path) -> None:
    from tasks.steps.base import InitStateRef, RunContext
    from tasks.steps.cache import cache_file, cache_get

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (marker.write_text, ("ran",))

    ctx = RunContext(params_path=str(tmp_path / "params.yaml"), root=str(tmp_path))
    for key in ("k1", "k2"):
        path = cache_file(ctx, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(Payload()))
    assert cache_get(ctx, "k1", InitStateRef) is None
    (tmp_path / ".prefect" / "results").mkdir(parents=True, exist_ok=True)
    (tmp_path / ".prefect" / "results" / "planted").write_bytes(pickle.dumps(Payload()))
    assert cache_get(ctx, "k2", InitStateRef) is None
    assert not marker.exists()


@pytest.mark.parametrize(
    ("exc", "code", "needle"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out.npy"), 9, "no space"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 9, "/ro/x"),
        (PermissionError(errno.EACCES, "Permission denied", "/p/x"), 9, "/p/x"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), 9, "/f/x"),
        (sqlite3.DatabaseError("file is not a database"), 5, "mlflow"),
        (RuntimeError("Failed to reach API at http://127.0.0.1:9/api/"), 11, "prefect"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (ZeroDivisionError("oops"), EXIT_INTERNAL, "internal error"),
    ],
)
def test_every_exception_is_one_line(exc: BaseException, code: int, needle: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert report("run", exc, verbose=False) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cubeline run: error: ")
    assert needle.lower() in err.lower() and "Traceback" not in err


def test_wrapped_cubeline_error_wins_and_verbose_shows_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        try:
            raise ConfigError("the real problem")
        except ConfigError as inner:
            raise RuntimeError("prefect wrapper") from inner
    except RuntimeError as outer:
        assert isinstance(user_error(outer), ConfigError)
        assert report("train", outer, verbose=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].endswith("the real problem")


def test_no_task_or_flow_persists_a_pickled_result() -> None:
    """A result that is never written is never read back: nothing under .prefect/results runs."""
    import importlib
    import pkgutil

    from prefect import Flow, Task

    import flows
    import tasks.steps

    found = []
    for pkg in (tasks.steps, flows):
        for info in pkgutil.iter_modules(pkg.__path__, f"{pkg.__name__}."):
            if info.name.endswith(("cli", "stack", "deploy")):
                continue
            module = importlib.import_module(info.name)
            found += [v for v in vars(module).values() if isinstance(v, Task | Flow)]
    assert len(found) >= 10
    assert all(obj.persist_result is False for obj in found), [
        obj.name for obj in found if obj.persist_result is not False
    ]
