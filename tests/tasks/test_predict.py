"""``cubeline phase1``'s report (tasks/predict.py) on the bundled session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.predict import phase1_report
from tests.flows.helpers import copy_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("predict") / "repo")


def test_phase1_report_scores_every_frame_after_one_fit(repo: Path) -> None:
    rep = phase1_report(repo / "params.yaml")
    assert [f["split"] for f in rep["frames"]] == ["train", "train", "train", "val", "test"]
    assert rep["pixels"] > 0 and 1 <= rep["passes"] <= 2  # normal-only pass + threshold pass
    # RX after Phase 1 alone separates the planes from the runway / the urban background.
    assert all(0.8 < f["auroc"] <= 1.0 and 0.0 < f["ap"] <= 1.0 for f in rep["frames"])
