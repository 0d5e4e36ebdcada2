"""DVC versioning on a real DVC repository: a temporary copy of this one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nodes.errors import ConfigError, DataValidationError
from tasks.versioning import (
    STATE_FILE,
    STATE_META,
    data_version,
    ensure_data,
    read_dvc_file,
    restore_init_state,
    version_init_state,
)
from tests.flows.helpers import copy_repo, git


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A fresh copy of the repository (data not checked out, as on a fresh clone)."""
    return copy_repo(tmp_path / "repo")


def _state(tmp: Path, payload: bytes) -> Path:
    d = tmp / f"staging-{payload[:4].hex()}"
    d.mkdir()
    (d / STATE_FILE).write_bytes(payload)
    (d / STATE_META).write_text('{"source_data_hash": "x"}\n')
    return d


def test_data_version_fresh_clone_clean_then_dirty(repo: Path) -> None:
    recorded, out = read_dvc_file(repo)
    assert out == "data" and recorded.endswith(".dir")
    assert not (repo / "data").exists()
    assert ensure_data(repo) is True  # pulled from the in-repo remote
    assert ensure_data(repo) is False
    v = data_version(repo, paths=[repo / "data/session/abu-airport-1.mat"])
    assert v.content_hash == v.recorded_hash == recorded
    assert not v.dirty
    with (repo / "data/session/abu-urban-5.mat").open("ab") as fh:
        fh.write(b"\0")
    changed = data_version(repo)
    assert changed.dirty and changed.content_hash != recorded
    assert changed.recorded_hash == recorded


def test_unversioned_paths_are_hashed_file_by_file(repo: Path, tmp_path: Path) -> None:
    ensure_data(repo)
    new = tmp_path / "incoming.mat"
    shutil.copy2(repo / "data/session/abu-urban-5.mat", new)
    v = data_version(repo, paths=[new])
    assert v.dirty and v.content_hash.endswith(".files")
    assert data_version(repo, paths=[new]).content_hash == v.content_hash
    with new.open("ab") as fh:
        fh.write(b"\0")
    assert data_version(repo, paths=[new]).content_hash != v.content_hash
    with pytest.raises(DataValidationError, match="do not exist"):
        data_version(repo, paths=[tmp_path / "nope.mat"])


def test_state_round_trip_through_cache_and_remote(repo: Path, tmp_path: Path) -> None:
    states = repo / "outputs" / "states"
    payload = b"state-bytes" * 1000
    h = version_init_state(_state(tmp_path, payload), root=repo, remote="local", states_dir=states)
    assert h.endswith(".dir") and len(h) == 36
    assert (states / h[:-4] / STATE_FILE).read_bytes() == payload
    assert (repo / "dvc-remote/files/md5" / h[:2] / h[2:]).is_file()
    # Same content again: same hash, nothing duplicated.
    again = version_init_state(
        _state(tmp_path / "..", payload), root=repo, remote="local", states_dir=states
    )
    assert again == h
    # Fresh machine: no checkout, empty cache -> pulled from the remote by hash.
    shutil.rmtree(states)
    shutil.rmtree(repo / ".dvc" / "cache")
    path = restore_init_state(h, root=repo, remote="local", states_dir=states)
    assert path == states / h[:-4] / STATE_FILE
    assert path.read_bytes() == payload
    assert (path.parent / STATE_META).is_file()
    # A tampered checkout is replaced by the versioned content.
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    assert (
        restore_init_state(h, root=repo, remote="local", states_dir=states).read_bytes() == payload
    )


def test_versioning_leaves_the_git_tree_unchanged(repo: Path, tmp_path: Path) -> None:
    ensure_data(repo)
    before = git(repo, "status", "--porcelain")
    version_init_state(
        _state(tmp_path, b"abc"), root=repo, remote="local", states_dir=repo / "outputs" / "states"
    )
    data_version(repo)
    assert git(repo, "status", "--porcelain") == before


def test_unknown_and_malformed_hashes(repo: Path) -> None:
    states = repo / "outputs" / "states"
    with pytest.raises(ConfigError, match="neither in the DVC cache"):
        restore_init_state("0" * 32 + ".dir", root=repo, remote="local", states_dir=states)
    with pytest.raises(ConfigError, match="not an initialization-state hash"):
        restore_init_state("abc", root=repo, remote="local", states_dir=states)


def test_incomplete_state_dir_is_refused(repo: Path, tmp_path: Path) -> None:
    d = tmp_path / "half"
    d.mkdir()
    (d / STATE_FILE).write_bytes(b"x")
    with pytest.raises(ConfigError, match="exactly"):
        version_init_state(d, root=repo, remote="local", states_dir=repo / "outputs" / "states")
    assert not (repo / "outputs" / "states").exists()
