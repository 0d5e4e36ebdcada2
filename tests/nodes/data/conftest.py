"""Fixtures of the data-layer tests: real ABU scenes and small seeded generated frames."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture
def make_cube() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Seeded (H, W, C) float32 cube with a planted square anomaly, and its mask."""

    def make(h: int = 12, w: int = 10, c: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        cube = rng.normal(100.0, 5.0, size=(h, w, c)).astype(np.float32)
        mask = np.zeros((h, w), dtype=bool)
        mask[2:4, 3:5] = True
        cube[mask] += 40.0
        return cube, mask

    return make


@pytest.fixture
def make_npz(tmp_path: Path, make_cube: Callable[..., Any]) -> Callable[..., Path]:
    """Write a Cubert-style .npz export; keyword overrides replace or (None) drop a key."""

    def make(name: str = "frame.npz", seed: int = 0, **overrides: Any) -> Path:
        cube, mask = make_cube(seed=seed)
        class_mask = mask.astype(np.uint8) * 3
        arrays: dict[str, Any] = {
            "cube": cube,
            "wavelengths": np.arange(450, 450 + 10 * cube.shape[2], 10, dtype=np.int64),
            "mask": mask.astype(np.int64),
            "class_mask": class_mask,
        }
        for key, value in overrides.items():
            if value is None:
                arrays.pop(key, None)
            else:
                arrays[key] = value
        path = tmp_path / name
        np.savez(path, **arrays)
        return path

    return make


@pytest.fixture
def write_json(tmp_path: Path) -> Callable[[dict[str, Any], str], Path]:
    def write(content: dict[str, Any], name: str = "annotations.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(content))
        return path

    return write
