"""Batch collation into NumPy-allocated buffers (nodes/data/collate.py)."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from nodes.data.collate import collate_frames


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
