"""Phase-2 resume checkpoints are checked before use (tasks/steps/resume.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch

from tasks.steps.resume import Phase2Resume


class _Payload:
    """Pickles to a call of ``os.system``: what a planted checkpoint would try to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _write(folder: Path, payload: bytes, record: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "last.ckpt"
    ckpt.write_bytes(payload)
    if record:
        (folder / "last.sha256").write_text(hashlib.sha256(payload).hexdigest())
    return ckpt


def _checkpoint_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "made.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 2, "global_step": 6}, path)
    return path.read_bytes()


def test_a_recorded_checkpoint_is_resumed(tmp_path: Path) -> None:
    resume = Phase2Resume(tmp_path / "key", enabled=True)
    ckpt = _write(resume.folder, _checkpoint_bytes(tmp_path))
    assert resume.last() == ckpt


@pytest.mark.parametrize(
    "case", ["no_hash", "tampered", "garbage", "planted_pickle", "not_lightning"]
)
def test_an_untrusted_checkpoint_is_discarded(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "ran"
    good = _checkpoint_bytes(tmp_path)
    resume = Phase2Resume(tmp_path / "key", enabled=True)
    if case == "no_hash":
        _write(resume.folder, good, record=False)
    elif case == "tampered":
        _write(resume.folder, good)
        (resume.folder / "last.ckpt").write_bytes(good[:-8] + b"\0" * 8)
    elif case == "garbage":
        _write(resume.folder, b"not a checkpoint at all")
    elif case == "planted_pickle":  # with a matching hash: the load itself must refuse it
        _write(resume.folder, pickle.dumps({"state_dict": _Payload(marker), "epoch": 1}))
    else:
        path = tmp_path / "other.pt"
        torch.save({"weights": torch.ones(2)}, path)
        _write(resume.folder, path.read_bytes())
    assert resume.last() is None
    assert not resume.folder.exists()  # discarded: the next epoch writes a fresh one
    assert not marker.exists()  # nothing in the file ran
    assert "Phase 2 starts over" in caplog.text
