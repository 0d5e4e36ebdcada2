"""Batch collation into reused NumPy-allocated buffers (nodes/data/collate.py)."""

from __future__ import annotations

import pickle

import torch
from torch.utils.data import default_collate

from nodes.data.collate import KEEP_BUFFERS, FrameCollator, collate_frames


def test_same_batch_as_default_collate() -> None:
    g = torch.Generator().manual_seed(0)
    samples = [
        {"cube": torch.rand(5, 4, 3, generator=g), "mask": torch.rand(5, 4, generator=g) > 0.5,
         "wavelengths": torch.arange(3, dtype=torch.float32),
         "frame_id": torch.tensor(i, dtype=torch.int64), "half": torch.ones(2).to(torch.bfloat16)}
        for i in range(3)
    ]
    got, want = collate_frames(samples), default_collate(samples)
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert torch.equal(got[key], want[key])
    assert got["cube"].shape == (3, 5, 4, 3)
    assert got["frame_id"].tolist() == [0, 1, 2]


def test_buffer_reused_only_when_no_batch_refers_to_it() -> None:
    collate = FrameCollator()
    samples = [{"cube": torch.rand(256, 256, 4)} for _ in range(2)]  # 2 MB batches
    first = collate(samples)
    ptr = first["cube"].data_ptr()
    held = collate(samples)
    assert held["cube"].data_ptr() != ptr  # the first batch is still held
    del first
    again = collate(samples)
    assert again["cube"].data_ptr() == ptr  # dropped: its buffer comes back
    assert torch.equal(again["cube"][1], samples[1]["cube"])
    view = again["cube"].reshape(-1, 4)[:10]
    numpy_view = held["cube"].numpy()
    del again, held
    fresh = collate(samples)  # a view or a NumPy array of a batch keeps its buffer taken
    assert fresh["cube"].data_ptr() not in (ptr, numpy_view.ctypes.data)
    assert view.shape == (10, 4)
    assert len(collate._kept) <= KEEP_BUFFERS  # the oldest kept buffer lives on with its batch
    kept = fresh["cube"].data_ptr()
    del fresh
    assert collate(samples)["cube"].data_ptr() == kept


def test_collator_pickles_without_its_buffers() -> None:
    collate = FrameCollator()
    batch = collate([{"cube": torch.rand(256, 256, 8)}])
    clone = pickle.loads(pickle.dumps(collate))
    assert torch.equal(clone([{"cube": batch["cube"][0]}])["cube"], batch["cube"])
