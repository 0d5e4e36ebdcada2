"""Reading files ahead on worker threads (nodes/data/readahead.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nodes.data.readahead import read_ahead
from nodes.errors import DataValidationError


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_frames_come_in_order_and_errors_in_their_turn(
        make_npz: Callable[..., Path], tmp_path: Path, workers: int) -> None:
    paths = [make_npz(f"f{i}.npz", seed=i) for i in range(5)]
    frames = list(read_ahead(((p, [0]) for p in paths), require_labels=True, workers=workers))
    assert [f.source for f in frames] == paths
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.cube, np.load(paths[i])["cube"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    got = []
    with pytest.raises(DataValidationError, match=r"bad\.npz"):
        for f in read_ahead(((p, [0]) for p in [*paths[:2], bad, *paths[2:]]),
                            require_labels=True, workers=workers):
            got.append(f.source)
    assert got == paths[:2]
