"""Initialization state alone (nodes/training/init_state.py): round trip, metadata, mismatches."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodes import ConfigError, NotInitializedError, Pipeline, RXGlobal, StatisticalTrainer
from nodes.library.presets import build_channel_selector_pipeline
from nodes.training.init_state import (
    STATE_FORMAT,
    load_init_state,
    read_init_info,
    read_init_moments,
    save_init_state,
)
from nodes.training.statistical_trainer import FitReport


def _batch(cubes: Any, ids: list[int]) -> dict[str, torch.Tensor]:
    return {"cube": torch.from_numpy(np.stack([cubes.cubes[i] for i in ids])),
            "mask": torch.from_numpy(np.stack([cubes.masks[i] for i in ids]))}


def _snapshot(p: Pipeline) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in p.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a
    )


@pytest.fixture
def fitted(cubes: Any, make_dm: Callable[..., Any]) -> tuple[Pipeline, FitReport]:
    pipe = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    report = StatisticalTrainer(pipeline=pipe, datamodule=make_dm(train_ids=[0, 1, 2])).fit()
    return pipe, report


def test_round_trip_gives_identical_scores_on_a_fresh_pipeline(
    fitted: tuple[Pipeline, FitReport], cubes: Any, tmp_path: Path
) -> None:
    pipe, report = fitted
    path = tmp_path / "init" / "state.pt"
    save_init_state(pipe, path, source_data_hash="md5:abc123", fit_report=report)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json", "state.pt"]
    # The file is plain tensors: loadable with weights_only=True.
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == STATE_FORMAT
    fresh = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    assert not fresh.nodes["rx"].is_initialized
    load_init_state(fresh, path)
    assert all(n.is_initialized for n in fresh.node_list())
    batch = _batch(cubes, [3, 4])
    a, b = pipe.forward(batch=batch), fresh.forward(batch=batch)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_metadata(fitted: tuple[Pipeline, FitReport], tmp_path: Path) -> None:
    pipe, report = fitted
    path = tmp_path / "state.pt"
    info = save_init_state(pipe, path, source_data_hash="md5:abc123", fit_report=report,
                           extra={"source": "data/session"})
    on_disk = read_init_info(path)
    assert on_disk == info
    assert json.loads(path.with_suffix(".json").read_text())["source_data_hash"] == "md5:abc123"
    assert info.version and info.version != "unknown"
    assert info.created[:4].isdigit() and "T" in info.created  # ISO 8601
    assert info.source_data_hash == "md5:abc123"
    assert info.pixel_count == 3 * 24 * 24
    assert info.passes == report.passes == 2
    assert info.root == "data.cube"
    assert info.nodes == {"normalizer": "MinMaxNormalizer", "selector": "SoftChannelSelector",
                          "rx": "RXGlobal", "logit_head": "ScoreToLogit"}
    assert info.extra == {"source": "data/session"}
    assert len(info.content_sha256) == 64
    # The raw-band training moments travel with the state (for drift checks).
    m = read_init_moments(path)
    assert m.count == info.pixel_count
    assert torch.equal(m.m2, report.root_moments["data.cube"].m2)


def test_channel_count_mismatch_is_an_error_and_leaves_the_pipeline_untouched(
    fitted: tuple[Pipeline, FitReport], cubes: Any, tmp_path: Path
) -> None:
    pipe, report = fitted
    path = tmp_path / "state.pt"
    save_init_state(pipe, path, source_data_hash="x", fit_report=report)
    other = build_channel_selector_pipeline(input_channels=cubes.channels + 3, n_select=4)
    before = _snapshot(other)
    with pytest.raises(ConfigError) as err:
        load_init_state(other, path)
    msg = str(err.value)
    assert "state.pt" in msg and "selector.channel_logits" in msg and "channel count" in msg
    assert _same(_snapshot(other), before)
    assert not any(n.is_initialized for n in other.node_list() if n.requires_initial_fit)


def test_state_for_other_nodes_is_an_error(
    fitted: tuple[Pipeline, FitReport], cubes: Any, tmp_path: Path
) -> None:
    pipe, report = fitted
    path = tmp_path / "state.pt"
    save_init_state(pipe, path, source_data_hash="x", fit_report=report)
    renamed = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    rx = renamed.nodes.pop("rx")  # a differently built pipeline
    assert isinstance(rx, RXGlobal)
    rx.name = "detector"
    renamed.nodes["detector"] = rx
    before = _snapshot(renamed)
    with pytest.raises(ConfigError, match=r"state\.pt holds nodes \['rx'\]"):
        load_init_state(renamed, path)
    assert _same(_snapshot(renamed), before)


def test_saving_an_unfitted_pipeline_writes_nothing(cubes: Any, tmp_path: Path) -> None:
    pipe = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    with pytest.raises(NotInitializedError):
        save_init_state(pipe, tmp_path / "s.pt", source_data_hash="x", fit_report=FitReport())
    assert list(tmp_path.iterdir()) == []


def test_unsafe_or_foreign_state_files(
    fitted: tuple[Pipeline, FitReport], tmp_path: Path
) -> None:
    pipe, _ = fitted
    evil = tmp_path / "evil.pt"
    torch.save({"format": STATE_FORMAT, "nodes": {"rx": {"mu": _Payload()}}}, evil)
    with pytest.raises(ConfigError, match=r"evil\.pt.*weights_only"):
        load_init_state(pipe, evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"rx_mean": torch.zeros(4)}, foreign)  # the guide's ad-hoc dict
    with pytest.raises(ConfigError, match=r"foreign\.pt is not a cubeline initialization state"):
        load_init_state(pipe, foreign)
    with pytest.raises(ConfigError, match="does not exist"):
        load_init_state(pipe, tmp_path / "missing.pt")


class _Payload:
    pass
