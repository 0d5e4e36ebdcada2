"""Scoring with a champion: unwritable or hostile output folders, tampered model files, bad
frames (slow: one real run per session makes the champion; the cases then run in-process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import MARK_ENV, assert_clean_failure, run_states, undecided_versions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def champion_repo(prepared_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("champion") / "repo"
    shutil.copytree(prepared_repo, root, symlinks=True)
    env = {**os.environ, MARK_ENV: str(root)}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CUBELINE_MLFLOW_TRACKING_URI",
                "CUBELINE_FAULT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture()
def frame(champion_repo: Path) -> Path:
    return champion_repo / "data" / "session" / "abu-urban-5.mat"


@pytest.fixture()
def model_weights(champion_repo: Path) -> Iterator[Path]:
    """The champion's weights file in the artifact store (restored after the case)."""
    stored = next((champion_repo / "mlartifacts" / "models").rglob("*.pt"))
    original = stored.read_bytes()
    yield stored
    stored.write_bytes(original)


def _after(root: Path) -> None:
    assert "RUNNING" not in run_states(root)
    assert undecided_versions(root) == []


def test_out_under_a_file(champion_repo: Path, cli: Callable[..., tuple[int, str]],
                          frame: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    rc, err = cli(champion_repo, "predict", str(frame), "--out", str(tmp_path / "afile" / "o"))
    assert_clean_failure(rc, err, "predict", 9, "afile")
    _after(champion_repo)


def test_out_through_a_dangling_link(champion_repo: Path, cli: Callable[..., tuple[int, str]],
                                     frame: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    rc, err = cli(champion_repo, "predict", str(frame), "--out", str(tmp_path / "link" / "o"))
    assert_clean_failure(rc, err, "predict", 9, "link")


def test_planted_symlink_in_out_is_replaced_not_followed(
    champion_repo: Path, cli: Callable[..., tuple[int, str]], frame: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "abu-urban-5_0.scores.npy").symlink_to(victim)
    rc, err = cli(champion_repo, "predict", str(frame), "--out", str(out))
    assert rc == 0, err
    assert victim.read_text() == "keep me"
    assert not (out / "abu-urban-5_0.scores.npy").is_symlink()
    assert not list(out.glob(".*.tmp"))  # no partial files


@pytest.mark.parametrize("content", [b"", b"appended"], ids=["empty", "appended"])
def test_tampered_model_file_never_loads(
    champion_repo: Path, cli: Callable[..., tuple[int, str]], frame: Path, tmp_path: Path,
    model_weights: Path, content: bytes,
) -> None:
    model_weights.write_bytes(b"" if not content else model_weights.read_bytes() + content)
    rc, err = cli(champion_repo, "predict", str(frame), "--out", str(tmp_path / "o"))
    assert_clean_failure(rc, err, "predict", 10, "sha256")
    assert not (tmp_path / "o").exists()


def test_bad_frame_to_score(champion_repo: Path, cli: Callable[..., tuple[int, str]],
                            tmp_path: Path) -> None:
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a MATLAB file")
    rc, err = cli(champion_repo, "predict", str(bad), "--out", str(tmp_path / "o"))
    assert_clean_failure(rc, err, "predict", 3, "bad.mat")
    assert not (tmp_path / "o").exists()


def test_unknown_alias(champion_repo: Path, cli: Callable[..., tuple[int, str]], frame: Path,
                       tmp_path: Path) -> None:
    rc, err = cli(champion_repo, "predict", str(frame), "--alias", "nope", "--out",
                  str(tmp_path / "o"))
    assert_clean_failure(rc, err, "predict", 4, "nope")
