"""Seeded synthetic hyperspectral cubes for the benchmarks: correlated bands + planted targets."""

from __future__ import annotations

import argparse

import numpy as np
import torch


def make_cubes(n: int, size: int = 256, channels: int = 61, seed: int = 0,
               latent: int = 8, targets: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """``n`` cubes (size, size, channels) float32 and their anomaly masks.

    Background pixels are a random mix of ``latent`` smooth spectra plus noise (so bands are
    correlated, like real sensors); each cube gets ``targets`` small squares of another spectrum.
    """
    rng = np.random.default_rng(seed)
    wl = np.linspace(0, 1, channels)
    basis = np.stack([np.exp(-((wl - c) ** 2) / 0.02) for c in rng.uniform(0, 1, latent)])
    target_spec = np.exp(-((wl - rng.uniform()) ** 2) / 0.01)
    cubes = np.empty((n, size, size, channels), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        abund = rng.gamma(2.0, 1.0, size=(size * size, latent)).astype(np.float32)
        cube = abund @ basis.astype(np.float32)
        cube += 0.05 * rng.standard_normal(cube.shape, dtype=np.float32)
        cube = cube.reshape(size, size, channels)
        for _ in range(targets):
            r, c = rng.integers(0, size - 6, size=2)
            k = int(rng.integers(2, 6))
            masks[i, r : r + k, c : c + k] = True
            patch = cube[r : r + k, c : c + k]
            cube[r : r + k, c : c + k] = 0.5 * patch + 2.0 * target_spec.astype(np.float32)
        cubes[i] = cube
    return cubes, masks


def make_cubes_torch(n: int, size: int = 256, channels: int = 61, seed: int = 0,
                     device: str = "cpu") -> torch.Tensor:
    """Fast correlated cubes generated directly on ``device`` (throughput runs, no masks)."""
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(8, channels, generator=g, device=device)
    lat = torch.randn(n, size, size, 8, generator=g, device=device)
    noise = 0.05 * torch.randn(n, size, size, channels, generator=g, device=device)
    return lat @ mix + noise + 3.0


class TensorBatches:
    """A minimal datamodule over tensors already in memory (or on the GPU).

    Args:
        cubes: (N, H, W, C) tensor.
        batch_size: Cubes per batch.
        masks: Optional (N, H, W) bool tensor.
    """

    def __init__(self, cubes: torch.Tensor, batch_size: int,
                 masks: torch.Tensor | None = None) -> None:
        self.cubes, self.batch_size = cubes, batch_size
        self.masks = masks if masks is not None else torch.zeros(
            cubes.shape[:3], dtype=torch.bool, device=cubes.device)

    def setup(self, stage: str) -> None:
        """Nothing to prepare."""

    def train_dataloader(self) -> list[dict[str, torch.Tensor]]:
        """Batches of the batch contract."""
        return [
            {"cube": self.cubes[i : i + self.batch_size],
             "mask": self.masks[i : i + self.batch_size]}
            for i in range(0, self.cubes.shape[0], self.batch_size)
        ]

    val_dataloader = train_dataloader


def add_cube_args(ap: argparse.ArgumentParser, cubes: int, repeats_help: str | None = None,
                  repeats: int = 3) -> None:
    """The options every benchmark over synthetic cubes shares: how many, how large, batching."""
    ap.add_argument("--cubes", type=int, default=cubes)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--channels", type=int, default=61)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
