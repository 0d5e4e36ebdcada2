"""Fixtures of the data-layer tests: real ABU scenes and small seeded generated frames."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_ABU = REPO_ROOT.parent / "shared" / "data" / "abu"

SESSION_SCENES = ["abu-airport-1", "abu-airport-2", "abu-airport-3", "abu-urban-4", "abu-urban-5"]
EXTRA_SCENES = ["abu-urban-1", "abu-urban-2", "abu-beach-3"]


def _scene_path(name: str) -> Path:
    """The repo's bundled copy (data/session or data/extra) if pulled, else the shared one."""
    sub = "session" if name in SESSION_SCENES else "extra"
    for candidate in (REPO_ROOT / "data" / sub / f"{name}.mat", SHARED_ABU / f"{name}.mat"):
        if candidate.is_file():
            return candidate
    pytest.skip(f"{name}.mat not found (run `dvc pull`)")


@pytest.fixture
def scene() -> Callable[[str], Path]:
    """Path of a real ABU scene by name (skips the test when neither copy exists)."""
    return _scene_path


@pytest.fixture
def session_paths() -> list[Path]:
    """The five Los Angeles scenes of the bundled session, in frame-id order."""
    return [_scene_path(n) for n in SESSION_SCENES]


@pytest.fixture
def extra_paths() -> list[Path]:
    """The three other scenes (different band counts)."""
    return [_scene_path(n) for n in EXTRA_SCENES]


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
