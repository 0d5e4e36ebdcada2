"""Data versions: ingestion, validation, content addressing, restore from the remote, old + new."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from nodes.errors import ConfigError, DataValidationError
from tasks.data_versions import (
    MANIFEST,
    Split,
    combine_versions,
    default_split,
    ingest_frames,
    restore_data_version,
)
from tests.flows.helpers import copy_repo, git

SCENES = ("abu-airport-1", "abu-airport-2", "abu-airport-3", "abu-urban-4", "abu-urban-5")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.versioning import ensure_data

    root = copy_repo(tmp_path_factory.mktemp("versions") / "repo")
    ensure_data(root)
    return root


def _frames(repo: Path) -> list[Path]:
    return [repo / "data" / "session" / f"{s}.mat" for s in SCENES]


def _ingest(repo: Path, files: list[Path], **kw: object) -> object:
    return ingest_frames(
        files,
        root=repo,
        remote="local",
        versions_dir=repo / "outputs" / "data_versions",
        expected_channels=205,
        **kw,  # type: ignore[arg-type]
    )


def test_default_split_and_its_limits() -> None:
    assert default_split(5) == Split((0, 1, 2), (3,), (4,))
    assert default_split(6, val_frames=2, test_frames=2) == Split((0, 1), (2, 3), (4, 5))
    with pytest.raises(ConfigError, match="at least 3 frames"):
        default_split(2)


def test_ingest_is_content_addressed_and_restorable_from_the_remote(repo: Path) -> None:
    before = git(repo, "status", "--porcelain")
    info = _ingest(repo, _frames(repo))
    assert info.version.endswith(".dir") and len(info.version) == 36  # type: ignore[attr-defined]
    assert info.split == Split((0, 1, 2), (3,), (4,))  # type: ignore[attr-defined]
    manifest = json.loads((info.path / MANIFEST).read_text())  # type: ignore[attr-defined]
    assert manifest["frame_names"][4] == "abu-urban-5.mat#0" and manifest["channels"] == 205
    # Same frames and split: same version, nothing new; the git tree is untouched.
    assert _ingest(repo, _frames(repo)).version == info.version  # type: ignore[attr-defined]
    assert git(repo, "status", "--porcelain") == before
    # Another machine: no checkout, no cache -- the remote alone restores it by hash.
    shutil.rmtree(repo / "outputs" / "data_versions")
    shutil.rmtree(repo / ".dvc" / "cache")
    back = restore_data_version(
        info.version,  # type: ignore[attr-defined]
        root=repo,
        remote="local",
        versions_dir=repo / "outputs" / "data_versions",
    )
    assert back == info
    src = scipy.io.loadmat(_frames(repo)[4])["data"]
    got = scipy.io.loadmat(back.files[4])["data"]
    assert np.array_equal(src, got)


def test_bad_frames_are_refused_and_leave_nothing_behind(repo: Path, tmp_path: Path) -> None:
    frames = _frames(repo)
    versions = repo / "outputs" / "data_versions"
    before = sorted(p.name for p in versions.iterdir()) if versions.exists() else []
    bad = tmp_path / "abu-urban-5.mat"
    scene = scipy.io.loadmat(frames[4])
    cube = scene["data"].astype(np.float64)
    cube[1, 2, 3] = np.inf
    scipy.io.savemat(bad, {"data": cube, "map": scene["map"]})
    with pytest.raises(DataValidationError, match=r"abu-urban-5\.mat"):
        _ingest(repo, [*frames[:4], bad])
    with pytest.raises(DataValidationError, match="unsupported frame file"):
        _ingest(repo, [*frames[:4], tmp_path / "x.png"])
    with pytest.raises(DataValidationError, match="no such frame file"):
        _ingest(repo, [*frames[:4], tmp_path / "missing.mat"])
    # A test frame without any labelled anomaly cannot back the gate.
    blank = tmp_path / "blank.mat"
    scipy.io.savemat(blank, {"data": scene["data"], "map": np.zeros_like(scene["map"])})
    with pytest.raises(DataValidationError, match="hold no labelled anomalous pixel"):
        _ingest(repo, [*frames[:4], blank])
    with pytest.raises(ConfigError, match="both train and test"):
        _ingest(repo, frames, split=Split((0, 1, 4), (3,), (4,)))
    after = sorted(p.name for p in versions.iterdir()) if versions.exists() else []
    assert after == before  # no staging folder, no half-written version


def test_old_and_new_train_on_both_and_evaluate_on_the_new(repo: Path, tmp_path: Path) -> None:
    frames = _frames(repo)
    old = _ingest(repo, frames[:3] + frames[3:], split=Split((0, 1), (2, 3), (4,)))
    renamed = []
    for f in frames:
        dst = tmp_path / f"new-{f.name}"
        shutil.copyfile(f, dst)
        renamed.append(dst)
    new = _ingest(repo, renamed)
    both = combine_versions(
        old,  # type: ignore[arg-type]
        new,  # type: ignore[arg-type]
        root=repo,
        remote="local",
        versions_dir=repo / "outputs" / "data_versions",
        expected_channels=205,
    )
    names = both.frame_names
    assert [names[i] for i in both.split.train] == [
        "abu-airport-1.mat#0", "abu-airport-2.mat#0",
        "new-abu-airport-1.mat#0", "new-abu-airport-2.mat#0", "new-abu-airport-3.mat#0",
    ]
    assert [names[i] for i in both.split.test] == ["new-abu-urban-5.mat#0"]
    assert [names[i] for i in both.split.val] == ["new-abu-urban-4.mat#0"]
    assert both.parents == (old.version, new.version)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="both versions hold a frame file named"):
        combine_versions(
            old, old, root=repo, remote="local",  # type: ignore[arg-type]
            versions_dir=repo / "outputs" / "data_versions", expected_channels=205,
        )


def test_malformed_hash_is_a_clear_error(repo: Path) -> None:
    with pytest.raises(ConfigError, match="not a data-version hash"):
        restore_data_version(
            "nothex", root=repo, remote="local", versions_dir=repo / "outputs" / "dv"
        )
    with pytest.raises(ConfigError, match="neither in the DVC cache"):
        restore_data_version(
            "0" * 32 + ".dir", root=repo, remote="local", versions_dir=repo / "outputs" / "dv"
        )
