"""Phase 2 resumes from its last epoch after a kill, to the same final weights.

Each epoch's Lightning checkpoint (``last.ckpt``: weights, optimizer, scheduler, loop counters and
the best-epoch tracker) is kept under ``<repo>/outputs/phase2_checkpoints/<key>/``, where the key
is a digest of the data hash, the ``params.yaml`` sections Phase 2 reads and the Phase-1 state
hash. A run with the same key finds it and continues from there; a finished Phase 2 deletes it.
``cubeline run|train --no-resume`` (``$CUBELINE_RESUME=0``) starts over.

Nothing on disk is trusted: next to the checkpoint its writer records the checkpoint's SHA-256
(``last.sha256``), and a checkpoint that does not match it, or that does not load as plain data
(``weights_only``), is discarded with a warning and Phase 2 starts over.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.env import RESUME_ENV
from tasks.steps.base import DataRef, PipelineRef, RunContext
from tasks.steps.cache import short_digest

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "outputs/phase2_checkpoints"
_SECTIONS = ("data", "pipeline", "phase1", "phase2", "threshold")


@dataclass(frozen=True)
class Phase2Resume:
    """Where Phase 2 of this data, params and Phase-1 state keeps its last epoch.

    Attributes:
        folder: The checkpoint folder of the key.
        enabled: Resume when a checkpoint is there (``$CUBELINE_RESUME`` not ``0``).
    """

    folder: Path
    enabled: bool

    @classmethod
    def for_run(cls, ctx: RunContext, data: DataRef, pipe: PipelineRef) -> Phase2Resume:
        """The resume point of a run's Phase 2."""
        key = short_digest(
            data.data_hash, ctx.params.section_hash(*_SECTIONS), pipe.state_hash, pipe.unfrozen
        )
        enabled = os.environ.get(RESUME_ENV, "1") != "0"
        return cls(Path(ctx.root) / CHECKPOINTS_DIR / key, enabled)

    def callback(self) -> Any:
        """A Lightning callback writing ``last.ckpt`` here after every epoch (temp + rename)."""
        from lightning.pytorch.callbacks import Callback

        folder = self.folder

        class _SaveLast(Callback):
            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".last.{os.getpid()}.ckpt"
                trainer.save_checkpoint(tmp)
                digest = _sha256(tmp)
                # The hash first: a kill between the two renames leaves a mismatch (start over),
                # never a checkpoint that passes for another one.
                (folder / ".last.sha256.tmp").write_text(digest)
                os.replace(folder / ".last.sha256.tmp", folder / "last.sha256")
                os.replace(tmp, folder / "last.ckpt")

        return _SaveLast()

    def last(self) -> Path | None:
        """The checkpoint to resume from, None to start over (and drop a stale one)."""
        ckpt = self.folder / "last.ckpt"
        if not ckpt.is_file():
            return None
        if not self.enabled:
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        problem = _check(ckpt, self.folder / "last.sha256")
        if problem:
            log.warning("Phase 2 starts over: the checkpoint %s %s; it is discarded", ckpt, problem)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        log.warning("Phase 2 resumes from %s (same data, params and Phase-1 state)", ckpt)
        return ckpt

    def done(self) -> None:
        """Phase 2 finished: its resume point goes."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(ckpt: Path, recorded: Path) -> str:
    """What is wrong with a resume checkpoint ('' when it matches its hash and loads as data)."""
    import pickle

    import torch

    try:
        want = recorded.read_text().strip()
    except OSError:
        return "has no recorded hash"
    try:
        if _sha256(ckpt) != want:
            return "does not match the hash recorded when it was written"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        return f"cannot be read ({type(exc).__name__})"
    if not isinstance(state, dict) or not {"state_dict", "epoch"} <= set(state):
        return "is not a Lightning checkpoint"
    return ""
