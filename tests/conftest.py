"""Shared fixtures: seeded generated cubes with planted anomalies, the bundled real scenes.

Generated cubes have low-rank correlated bands (a few smooth spectral endmembers mixed per pixel,
plus sensor noise), like real radiance, and small square targets with a foreign spectrum; the
anomaly mask marks exactly those pixels. Everything is seeded so a failure reproduces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

REPO = Path(__file__).resolve().parents[1]

from nodes.data import CubeDataModule  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leaked_environment() -> Iterator[None]:
    """Give every test the environment the session started with.

    Code under test exports variables that later commands read: ``mlflow.set_tracking_uri``
    exports MLFLOW_TRACKING_URI (which cubeline honours when params.yaml leaves the URI unset),
    and the CLI called in-process sets the console log levels of the command it ran. Left in
    place, they would become the next test's defaults and reach its subprocesses.
    """
    import os

    saved = dict(os.environ)
    yield
    for k in set(os.environ) - set(saved):
        os.environ.pop(k, None)
    for k, v in saved.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


#: Where the ABU scenes may live: the repo's DVC-tracked copy first, then the shared originals.
SCENE_DIRS: tuple[Path, ...] = (
    REPO / "data" / "session",
    REPO / "data" / "extra",
    REPO.parent / "shared" / "data" / "abu",
)

#: The five Los Angeles scenes of the bundled session, in frame-id order.
SESSION_SCENES: tuple[str, ...] = ("airport-1", "airport-2", "airport-3", "urban-4", "urban-5")
#: The three other bundled scenes (data/extra; other band counts).
EXTRA_SCENES: tuple[str, ...] = ("urban-1", "urban-2", "beach-3")


def find_scene(name: str) -> Path | None:
    """Path of ``abu-<name>.mat`` in the repo's data (or the shared copy), None if absent."""
    for base in SCENE_DIRS:
        path = base / f"abu-{name}.mat"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def scene_path() -> Callable[[str], Path]:
    """``scene_path("airport-1")`` → path of the scene, or skip the test when it is absent."""

    def _get(name: str) -> Path:
        path = find_scene(name)
        if path is None:
            pytest.skip(f"scene abu-{name}.mat not found (run `dvc pull` to restore data/)")
        return path

    return _get


@pytest.fixture(scope="session")
def session_paths(scene_path: Callable[[str], Path]) -> list[Path]:
    """The bundled session's five scene files (frame ids 0..4)."""
    return [scene_path(s) for s in SESSION_SCENES]


@pytest.fixture(scope="session")
def extra_paths(scene_path: Callable[[str], Path]) -> list[Path]:
    """The three other bundled scenes (204, 207 and 188 bands)."""
    return [scene_path(s) for s in EXTRA_SCENES]


def make_cube(
    seed: int,
    height: int = 24,
    width: int = 24,
    channels: int = 12,
    n_targets: int = 3,
    target_size: int = 2,
    rank: int = 3,
    scene_seed: int = 1234,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (H, W, C) float32 cube with correlated bands and planted square targets.

    Frames of one ``scene_seed`` share their endmember spectra (one sensor, one scene); ``seed``
    draws the per-frame abundances, noise and target positions.

    Returns:
        ``(cube, mask)``: the cube and its (H, W) bool anomaly mask.
    """
    scene = np.random.default_rng(scene_seed)
    t = np.linspace(0.0, 1.0, channels)
    # Smooth endmember spectra: adjacent bands are strongly correlated, as in real sensors.
    centres = scene.uniform(0.0, 1.0, rank)
    widths = scene.uniform(0.2, 0.5, rank)
    endmembers = np.exp(-((t[None, :] - centres[:, None]) ** 2) / widths[:, None] ** 2)
    # A target spectrum that no mix of the smooth endmembers reproduces.
    target = 30.0 * np.sin(9.0 * t + scene.uniform(0, np.pi)) + 20.0
    rng = np.random.default_rng(seed)
    abundances = rng.gamma(8.0, 0.125, size=(height * width, rank))
    cube = 100.0 + 40.0 * abundances @ endmembers + rng.normal(0.0, 1.0, (height * width, channels))
    cube = cube.reshape(height, width, channels)
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(n_targets):
        r = int(rng.integers(0, height - target_size + 1))
        c = int(rng.integers(0, width - target_size + 1))
        cube[r : r + target_size, c : c + target_size] += target
        mask[r : r + target_size, c : c + target_size] = True
    return cube.astype(np.float32), mask


@dataclass
class Cubes:
    """A set of generated frames."""

    cubes: list[np.ndarray]
    masks: list[np.ndarray]

    @property
    def channels(self) -> int:
        return int(self.cubes[0].shape[-1])

    def pixels(self, ids: list[int] | None = None, dtype: Any = np.float64) -> np.ndarray:
        """(N, C) pixel rows of the given frames, in frame order."""
        ids = list(range(len(self.cubes))) if ids is None else ids
        return np.concatenate([self.cubes[i].reshape(-1, self.channels) for i in ids]).astype(dtype)

    def labels(self, ids: list[int] | None = None) -> np.ndarray:
        ids = list(range(len(self.masks))) if ids is None else ids
        return np.concatenate([self.masks[i].reshape(-1) for i in ids])


def make_cubes(n: int = 6, seed: int = 0, **kw: Any) -> Cubes:
    """``n`` generated frames with seeds ``seed, seed + 1, ...``."""
    pairs = [make_cube(seed + i, **kw) for i in range(n)]
    return Cubes([p[0] for p in pairs], [p[1] for p in pairs])


@pytest.fixture(scope="session")
def cubes() -> Cubes:
    """Six 24 x 24 x 12 generated frames (ids 0..5) with planted targets."""
    return make_cubes(6, seed=0)


@pytest.fixture(scope="session")
def cube_factory() -> Callable[..., Cubes]:
    """``cube_factory(n, seed, height=, width=, channels=, ...)`` → :class:`Cubes`."""
    return make_cubes


class CountingCubeDataModule(CubeDataModule):
    """A :class:`CubeDataModule` that counts the training frames it hands out.

    Frames are counted whether they come in batches (``train_dataloader``) or one by one
    (``frame_batches``, which Phase 1 reads); ``train_passes`` is the number of passes a
    trainer made over the training data.
    """

    train_frames_read: int = 0

    def train_dataloader(self) -> Any:
        loader = super().train_dataloader()
        owner = self

        class _Counting:
            def __len__(self) -> int:
                return len(loader)

            def __iter__(self) -> Iterator[Any]:
                for batch in loader:
                    owner.train_frames_read += int(batch["cube"].shape[0])
                    yield batch

        return _Counting()

    def frame_batches(self, split: str) -> Iterator[Any] | None:
        frames = super().frame_batches(split)
        if frames is None or split != "train":
            return frames
        return self._counted(frames)

    def _counted(self, frames: Iterator[Any]) -> Iterator[Any]:
        for batch in frames:
            self.train_frames_read += int(batch["cube"].shape[0])
            yield batch

    @property
    def train_passes(self) -> float:
        return self.train_frames_read / len(self.splits["train"])


@pytest.fixture
def make_dm(cubes: Cubes) -> Callable[..., CountingCubeDataModule]:
    """Build a counting in-memory datamodule over generated frames.

    ``make_dm(train_ids=[0, 1, 2], val_ids=[3], test_ids=[4], batch_size=2, data=cubes)``.
    """

    def _make(
        train_ids: list[int] | None = None,
        val_ids: list[int] | None = None,
        test_ids: list[int] | None = None,
        batch_size: int = 2,
        data: Cubes | None = None,
    ) -> CountingCubeDataModule:
        d = data or cubes
        return CountingCubeDataModule.from_arrays(
            d.cubes,
            d.masks,
            train_ids=train_ids or [0, 1, 2],
            val_ids=val_ids or [3],
            test_ids=test_ids or [4],
            batch_size=batch_size,
        )  # type: ignore[return-value]

    return _make


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with averaged ranks for ties)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    ranks = rankdata(scores)  # "average" method: ties share their mean rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@pytest.fixture(scope="session")
def auc() -> Callable[[np.ndarray, np.ndarray], float]:
    """The exact rank-based ROC AUC."""
    return exact_auc


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    # Node construction and subsampling must not depend on test order.
    torch.manual_seed(0)


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """``||a - b|| / ||b||`` in float64 (Frobenius)."""
    ta = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    tb = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    return float(torch.linalg.norm(ta - tb) / torch.linalg.norm(tb))


@pytest.fixture(scope="session")
def relerr() -> Callable[[Any, Any], float]:
    """``relerr(a, b)`` = ``||a - b|| / ||b||``."""
    return rel_err
