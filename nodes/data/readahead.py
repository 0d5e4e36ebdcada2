"""Reading the files of a data module ahead, on worker threads, in order.

Used by :meth:`nodes.data.CubeDataModule.setup`: while one frame is summarized and validated, the
next files are being read (file reads, CRC checks and NumPy conversions release the GIL).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path

from nodes.data.readers import Frame, iter_frames_at
from nodes.hardware import pool, worker_count


def _read_group(path: Path, indices: list[int], require_labels: bool) -> list[Frame]:
    """The frames ``indices`` of one file (run on a worker thread)."""
    return list(iter_frames_at(path, indices, require_labels=require_labels))


def read_ahead(groups: Iterable[tuple[Path, list[int]]], *, require_labels: bool,
               workers: int | None = None) -> Iterator[Frame]:
    """Yield the frames of ``(file, frame indices)`` groups in order, reading files ahead.

    At most ``workers`` (default: the CPUs of the process) ``.mat``/``.npz`` groups are in
    flight, so memory stays a few frames; a ``.cu3s`` session streams on the calling thread,
    frame by frame, through one SDK handle. A file's errors surface when its turn comes.

    Args:
        groups: ``(path, indices)`` pairs, in the order wanted.
        require_labels: Passed to :func:`nodes.data.readers.iter_frames_at`.
        workers: Reader threads.

    Yields:
        The frames, group by group.
    """
    w = workers or worker_count()
    pending: deque[Future[list[Frame]]] = deque()
    for path, indices in groups:
        if w == 1 or path.suffix.lower() == ".cu3s":
            while pending:
                yield from pending.popleft().result()
            yield from iter_frames_at(path, indices, require_labels=require_labels)
            continue
        pending.append(pool(w).submit(_read_group, path, indices, require_labels))
        if len(pending) > w:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()
