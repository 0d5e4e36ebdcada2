"""Batch collation of the data module: frames stacked into reused NumPy-allocated buffers.

A batch of a few 256 x 256 x 61 cubes is tens of MB. ``torch.stack`` allocates it through
PyTorch's CPU allocator, whose large blocks are fresh mappings touched page by page; NumPy asks
the kernel for transparent huge pages on large allocations, so the same stack into an
``np.empty`` buffer (wrapped by ``torch.from_numpy``, no copy) page-faults about 500 times less.

A :class:`FrameCollator` (a data module keeps one for all its loaders) also hands a batch
buffer out again once nothing but the collator refers to it: a consumer that drops each batch
before asking for the next (Phase 1 does) gets every batch in the same, already-mapped memory,
with no page faults at all, while one
that keeps batches (a training step, a list of outputs) gets fresh buffers, as before. Only
whole, unreferenced buffers are reused, so no batch a consumer still holds is ever overwritten.
Inside DataLoader worker processes the default collation stays (it stacks into shared memory).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

_NUMPY_DTYPES: dict[torch.dtype, np.dtype[Any]] = {}

#: Batch buffers a collator keeps for reuse: one for a consumer that drops each batch before
#: the next (Phase 1), two for one that holds a batch while the next is built (Lightning's
#: fetcher looks one batch ahead).
KEEP_BUFFERS = 2
#: Buffers below this size are simply allocated (reuse pays off for frame-sized ones).
REUSE_MIN_BYTES = 1 << 20


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any] | None:
    """The NumPy dtype of a torch dtype, or None where NumPy has none (bfloat16...)."""
    if dtype not in _NUMPY_DTYPES:
        try:
            _NUMPY_DTYPES[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:
            return None
    return _NUMPY_DTYPES[dtype]


class FrameCollator:
    """Stack single-frame sample dicts into one batch dict (as ``default_collate`` would).

    Callable as a DataLoader ``collate_fn``; see the module doc for the buffer reuse.
    """

    def __init__(self) -> None:
        self._kept: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < REUSE_MIN_BYTES:
            return np.empty(shape, dtype=dtype)
        with self._lock:
            for buf in self._kept:
                # Two references: the list's and getrefcount's argument. Any tensor or view
                # of a batch made from it holds one more, so a held batch is never reused.
                if buf.shape == shape and buf.dtype == dtype and sys.getrefcount(buf) <= 3:
                    return buf
            buf = np.empty(shape, dtype=dtype)
            self._kept.append(buf)
            if len(self._kept) > KEEP_BUFFERS:
                self._kept.pop(0)  # the oldest lives on only as long as its batch does
            return buf

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader worker processes: without buffers or lock."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``samples`` (dicts with the same keys; tensors of one shape per key).

        Returns:
            The batch: each tensor key stacked along a new leading axis.
        """
        if get_worker_info() is not None or not samples:
            return dict(default_collate(list(samples)))
        out: dict[str, Any] = {}
        for key in samples[0]:
            items = [s[key] for s in samples]
            first = items[0]
            np_dtype = _numpy_dtype(first.dtype) if isinstance(first, torch.Tensor) else None
            if np_dtype is None or any(
                    not isinstance(t, torch.Tensor) or t.shape != first.shape for t in items):
                out[key] = default_collate(items)
                continue
            buf = torch.from_numpy(self._buffer((len(items), *first.shape), np_dtype))
            out[key] = torch.stack(items, out=buf)
            del buf
        return out


def collate_frames(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``samples`` into one batch in fresh buffers (a :class:`FrameCollator` reuses them).

    Args:
        samples: Sample dicts with the same keys; tensors of one shape per key.

    Returns:
        The batch: each tensor key stacked along a new leading axis.
    """
    return FrameCollator()(samples)
