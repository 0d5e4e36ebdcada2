"""Lightning data modules over hyperspectral frames (files or in-memory arrays).

Frame ids index the frames of ``paths`` in order (a ``.cu3s`` session contributes one id per
measurement). ``setup`` reads every frame named by any split once, validates all of them through
the pandera schemas of :mod:`nodes.data.schemas` before training can start, and keeps as many
frames in memory as ``cache_bytes`` allows; frames beyond the budget are re-read from disk when a
batch needs them, so memory stays bounded for long sessions.

Batches follow the cubeline batch contract: ``cube`` (B, H, W, C) float32, ``mask`` (B, H, W)
bool (True = anomaly), ``class_mask`` (B, H, W) int64 when every frame has one, ``wavelengths``
(B, C) float32 (band indices 0..C-1 where the file stores none) and ``frame_id`` (B,) int64.

Why one module of over 400 lines: the file-backed and the in-memory data modules share their
split checks, frame cache and batch contract, and Lightning expects each as one class; the
readers, schemas, collation and read-ahead they use live in their own modules.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nodes.data.coco import CocoAnnotations, anomaly_mask, load_coco
from nodes.data.collate import FrameCollator
from nodes.data.npz_member import is_mapped
from nodes.data.readahead import read_ahead
from nodes.data.readers import Frame, count_frames, read_frame
from nodes.data.schemas import validate_frames
from nodes.errors import DataValidationError

log = logging.getLogger(__name__)

MEMORY_SOURCE = Path("<memory>")

Batch = dict[str, torch.Tensor]


class _FrameDataset(Dataset[Batch]):
    """Map-style dataset over a list of frame ids; ``load`` turns an id into a sample dict."""

    def __init__(self, frame_ids: Sequence[int], load: Callable[[int], Batch]) -> None:
        self.frame_ids = list(frame_ids)
        self._load = load

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __getitem__(self, i: int) -> Batch:
        return self._load(self.frame_ids[i])


def _check_ids(name: str, ids: Iterable[int]) -> list[int]:
    out: list[int] = []
    for fid in ids:
        if isinstance(fid, bool) or not isinstance(fid, int | np.integer):
            raise DataValidationError(
                f"{name}: frame id {fid!r} is not an integer. Fix: list frame indices as ints."
            )
        out.append(int(fid))
    if not out:
        raise DataValidationError(
            f"{name} is empty. Fix: give at least one frame id for every split (train, val, "
            "test); frames may appear in several splits."
        )
    dupes = sorted({f for f in out if out.count(f) > 1})
    if dupes:
        raise DataValidationError(
            f"{name} lists frame id(s) {dupes} more than once. Fix: list each frame once."
        )
    return out


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees
    exactly the frame order of an uninterrupted run (a sampler drawing from one long-lived
    generator would restart its sequence after the resume).

    Args:
        n: Number of items.
        seed: Base seed.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class CubeDataModule(L.LightningDataModule):
    """Train/val/test frames from ``.mat``/``.npz``/``.cu3s`` files, validated before use.

    Args:
        paths: Data files; frame ids number their frames in this order.
        train_ids: Frame ids of the training split.
        val_ids: Frame ids of the validation split.
        test_ids: Frame ids of the test split.
        batch_size: Frames per batch.
        annotation_path: Optional COCO JSON; ``image_id`` = frame id. When given it defines
            ``class_mask`` (category ids, 0 = background) and ``mask`` of every frame.
        num_workers: DataLoader worker processes.
        expected_channels: If given, every frame must have this many bands.
        cache_bytes: In-memory budget for frames; beyond it, frames are re-read on demand.
        normal_class_ids: Classes counted as normal when the mask comes from annotations.
        seed: Seed of the training shuffle.
    """

    def __init__(
        self,
        paths: Sequence[str | Path] | str | Path,
        train_ids: Sequence[int],
        val_ids: Sequence[int],
        test_ids: Sequence[int],
        batch_size: int,
        annotation_path: str | Path | None = None,
        num_workers: int = 0,
        expected_channels: int | None = None,
        cache_bytes: int = 2**31,
        normal_class_ids: Sequence[int] = (0,),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(paths, str | Path):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataValidationError("paths is empty. Fix: give at least one data file.")
        self.splits = {
            "train": _check_ids("train_ids", train_ids),
            "val": _check_ids("val_ids", val_ids),
            "test": _check_ids("test_ids", test_ids),
        }
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataValidationError(
                f"batch_size = {batch_size!r}: must be a positive integer. Fix: e.g. 4."
            )
        if cache_bytes < 0:
            raise DataValidationError(f"cache_bytes = {cache_bytes}: must be >= 0.")
        self.batch_size = batch_size
        self.annotation_path = Path(annotation_path) if annotation_path is not None else None
        self.num_workers = int(num_workers)
        self.expected_channels = expected_channels
        self.cache_bytes = int(cache_bytes)
        self.normal_class_ids = tuple(int(c) for c in normal_class_ids)
        self.seed = int(seed)
        self._index: list[tuple[Path, int]] = []
        self._cache: dict[int, Frame] = {}
        # One collator for all loaders, so a batch buffer is reused across epochs and fits.
        self._collate = FrameCollator()
        self._cached_bytes = 0
        self._labels: dict[int, np.ndarray] = {}  # frame id -> class mask from annotations
        self._summaries: pd.DataFrame | None = None
        self._with_class_mask = False
        self._memory_frames: list[Frame] | None = None  # set by from_arrays

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        cubes: Sequence[Any] | np.ndarray | torch.Tensor,
        masks: Sequence[Any] | np.ndarray | torch.Tensor,
        train_ids: Sequence[int],
        val_ids: Sequence[int],
        test_ids: Sequence[int],
        batch_size: int,
        wavelengths: Sequence[float] | np.ndarray | None = None,
        class_masks: Sequence[Any] | np.ndarray | None = None,
        expected_channels: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> CubeDataModule:
        """Data module over in-memory frames (synthetic data, benchmarks, tests).

        The arrays pass the same schema validation as files in ``setup``.

        Args:
            cubes: N cubes (H, W, C), as a sequence or one (N, H, W, C) array/tensor.
            masks: N anomaly masks (H, W) (bool or 0/1).
            train_ids: Frame ids (indices into ``cubes``) of the training split.
            val_ids: Validation frame ids.
            test_ids: Test frame ids.
            batch_size: Frames per batch.
            wavelengths: Optional (C,) band centres shared by all frames.
            class_masks: Optional N class masks (H, W).
            expected_channels: If given, every cube must have this many bands.
            num_workers: DataLoader worker processes.
            seed: Seed of the training shuffle.

        Returns:
            The data module (call ``setup`` before using the loaders).

        Raises:
            DataValidationError: Counts of cubes and masks differ, or wrong ranks.
        """
        cube_list = [np.asarray(c) for c in cubes]
        mask_list = [np.asarray(m) for m in masks]
        if len(cube_list) != len(mask_list):
            raise DataValidationError(
                f"{MEMORY_SOURCE}: got {len(cube_list)} cubes but {len(mask_list)} masks. Fix: "
                "pass one mask per cube."
            )
        class_list = [np.asarray(c) for c in class_masks] if class_masks is not None else None
        if class_list is not None and len(class_list) != len(cube_list):
            raise DataValidationError(
                f"{MEMORY_SOURCE}: got {len(cube_list)} cubes but {len(class_list)} class "
                "masks. Fix: pass one class mask per cube."
            )
        wl = None if wavelengths is None else np.asarray(wavelengths, dtype=np.float32)
        frames = []
        for i, (cube, mask) in enumerate(zip(cube_list, mask_list, strict=True)):
            if cube.dtype.kind not in "uifb" or mask.dtype.kind not in "uifb":
                raise DataValidationError(
                    f"{MEMORY_SOURCE} (frame {i}): cube/mask must be numeric arrays, got "
                    f"{cube.dtype}/{mask.dtype}. Fix: pass numeric arrays."
                )
            frames.append(
                Frame(
                    cube=np.ascontiguousarray(cube, dtype=np.float32),
                    mask=np.asarray(mask != 0, dtype=bool),
                    wavelengths=wl,
                    class_mask=None
                    if class_list is None
                    else np.asarray(class_list[i], dtype=np.int64),
                    source=MEMORY_SOURCE,
                    index=i,
                    raw_dtype=str(cube.dtype),
                )
            )
        dm = cls(
            paths=[MEMORY_SOURCE],
            train_ids=train_ids,
            val_ids=val_ids,
            test_ids=test_ids,
            batch_size=batch_size,
            num_workers=num_workers,
            expected_channels=expected_channels,
            cache_bytes=0,
            seed=seed,
        )
        dm._memory_frames = frames
        return dm

    # ------------------------------------------------------------------ setup
    def _build_index(self) -> list[tuple[Path, int]]:
        if self._memory_frames is not None:
            return [(MEMORY_SOURCE, i) for i in range(len(self._memory_frames))]
        index: list[tuple[Path, int]] = []
        for path in self.paths:
            index.extend((path, i) for i in range(count_frames(path)))
        return index

    def _read(self, frame_id: int) -> Frame:
        if self._memory_frames is not None:
            return self._memory_frames[frame_id]
        path, i = self._index[frame_id]
        return read_frame(path, i, require_labels=self.annotation_path is None)

    def _read_many(self, frame_ids: Sequence[int]) -> Iterator[Frame]:
        # Consecutive ids of one file are read through one handle (one SDK session per .cu3s).
        if self._memory_frames is not None:
            yield from (self._memory_frames[f] for f in frame_ids)
            return
        require_labels = self.annotation_path is None
        groups = (
            (path, [self._index[f][1] for f in group])
            for path, group in itertools.groupby(frame_ids, key=lambda f: self._index[f][0])
        )
        yield from read_ahead(groups, require_labels=require_labels)

    @property
    def is_setup(self) -> bool:
        """Whether ``setup`` has run (and every frame passed validation)."""
        return self._summaries is not None

    def setup(self, stage: str | None = None) -> None:
        """Index, read and validate every frame of every split; fill the cache.

        Runs once whatever the stage (Lightning calls it per stage), so nothing is trained on
        before all splits are known to be valid.

        Args:
            stage: Lightning stage (ignored; all splits are prepared together).

        Raises:
            DataValidationError: Ids out of range, unreadable files, failed schema checks,
                inconsistent band counts, or annotation problems.
        """
        if self.is_setup:
            return
        index = self._build_index()
        n = len(index)
        for name, ids in self.splits.items():
            bad = [f for f in ids if not 0 <= f < n]
            if bad:
                raise DataValidationError(
                    f"{name}_ids: frame id(s) {bad} out of range; the data has {n} frame(s) "
                    f"(valid ids 0..{n - 1}) from {[str(p) for p in self.paths]}. Fix: use ids "
                    "in that range."
                )
        self._index = index
        coco: CocoAnnotations | None = None
        if self.annotation_path is not None:
            coco = load_coco(self.annotation_path)
            coco.validate(n)

        wanted = sorted({f for ids in self.splits.values() for f in ids})
        cache: dict[int, Frame] = {}
        cached_bytes = 0
        labels: dict[int, np.ndarray] = {}
        rows = []
        frames = self._read_many(wanted)
        for fid in wanted:
            # next() rather than zip(): zip keeps its last (id, frame) tuple while the next
            # frame is read, and the loop drops its frame below, so the frames alive are the
            # reader's few in flight whatever the number of frames
            frame = next(frames)
            if coco is not None:
                h, w = frame.cube.shape[:2]
                labels[fid] = coco.class_mask(fid, h, w)
                frame = self._apply_labels(frame, labels[fid])
            rows.append(frame.summary(fid))
            # Frames are pinned first come, first served: a fixed set avoids thrashing when the
            # shuffled epoch order would defeat an LRU policy anyway.
            if self._memory_frames is None and cached_bytes + frame.nbytes <= self.cache_bytes:
                # Pinned frames own their memory (a mapped re-read would tie them to the file).
                cache[fid] = (
                    dataclasses.replace(frame, cube=np.array(frame.cube))
                    if is_mapped(frame.cube) else frame
                )
                cached_bytes += frame.nbytes
            del frame
        summaries = validate_frames(rows, expected_channels=self.expected_channels)
        self._check_consistent(summaries)
        unlabelled = summaries.loc[~summaries["labelled"], "frame_id"].tolist()
        if unlabelled:
            log.warning(
                "frames %s carry no labels (their masks are all False); give annotation_path "
                "for supervised training",
                unlabelled,
            )
        self._cache = cache
        self._cached_bytes = cached_bytes
        self._labels = labels
        self._with_class_mask = bool((summaries["class_mask_height"] > 0).all())
        self._summaries = summaries

    def _apply_labels(self, frame: Frame, class_mask: np.ndarray) -> Frame:
        return Frame(
            cube=frame.cube,
            mask=anomaly_mask(class_mask, self.normal_class_ids),
            wavelengths=frame.wavelengths,
            class_mask=class_mask,
            source=frame.source,
            index=frame.index,
            raw_dtype=frame.raw_dtype,
            labelled=True,
        )

    def _check_consistent(self, summaries: pd.DataFrame) -> None:
        # A pipeline has one input width, and default collation stacks frames: shapes must agree.
        channels = summaries.groupby("channels")["file"].apply(lambda s: sorted(set(s)))
        if len(channels) > 1:
            detail = "; ".join(f"{c} bands: {files}" for c, files in channels.items())
            raise DataValidationError(
                f"frames disagree on the band count ({detail}). Fix: use files of one sensor "
                "in one data module (e.g. data/session/), or set expected_channels to find the "
                "odd ones."
            )
        sizes = summaries.groupby(["height", "width"])["file"].apply(lambda s: sorted(set(s)))
        if len(sizes) > 1 and self.batch_size > 1:
            detail = "; ".join(f"{h}x{w}: {files}" for (h, w), files in sizes.items())
            raise DataValidationError(
                f"frames disagree on height x width ({detail}) and batch_size = "
                f"{self.batch_size} stacks frames. Fix: use batch_size=1 or frames of one size."
            )

    def _require_setup(self) -> None:
        if not self.is_setup:
            raise DataValidationError(
                "the data module is not set up. Fix: call datamodule.setup() first (the "
                "trainers do it for you)."
            )

    # ------------------------------------------------------------------ access
    def get_frame(self, frame_id: int) -> Frame:
        """The frame with this id: from the cache, else re-read (labels applied).

        Args:
            frame_id: Global frame id.

        Returns:
            The frame.
        """
        self._require_setup()
        cached = self._cache.get(frame_id)
        if cached is not None:
            return cached
        frame = self._read(frame_id)
        if frame_id in self._labels:
            frame = self._apply_labels(frame, self._labels[frame_id])
        return frame

    def _sample(self, frame_id: int) -> Batch:
        frame = self.get_frame(frame_id)
        channels = frame.cube.shape[2]
        wl = frame.wavelengths if frame.wavelengths is not None else np.arange(channels)
        sample = {
            "cube": torch.from_numpy(frame.cube),
            "mask": torch.from_numpy(frame.mask),
            "wavelengths": torch.as_tensor(wl, dtype=torch.float32),
            "frame_id": torch.tensor(frame_id, dtype=torch.int64),
        }
        if self._with_class_mask and frame.class_mask is not None:
            sample["class_mask"] = torch.as_tensor(frame.class_mask, dtype=torch.int64)
        return sample

    def frame_batches(self, split: str) -> Iterator[Batch] | None:
        """The frames of a split as one-frame batches, in split order, for order-free passes.

        Phase 1 (:class:`~nodes.training.StatisticalTrainer`) reads these instead of
        :meth:`train_dataloader`: its float64 sums do not depend on how frames are batched, and
        a one-frame batch is the frame itself (a mapped re-read of a verified ``.npz`` member, a
        cached or in-memory array), with no copy into a stacked batch; on a 2-vCPU Xeon that
        copy was a quarter of Phase 1's time from ``.npz``. Each batch holds what a collated
        batch of one holds (``cube`` (1, H, W, C), ``mask`` (1, H, W), ...) in tensors of its
        own, never written afterwards, so a consumer may keep a few and sum them together
        (Phase 1 does, up to :func:`nodes.training.stats_blocked.gather_rows` pixels); one is
        alive at a time if the consumer drops each before the next.

        Args:
            split: Split name.

        Returns:
            The iterator, or None with ``num_workers > 0`` (reading then stays with the
            DataLoader's worker processes).
        """
        self._require_setup()
        if split not in self.splits:
            raise DataValidationError(
                f"unknown split {split!r}. Fix: use one of {list(self.splits)}."
            )
        if self.num_workers > 0:
            return None
        return self._frame_batches(self.splits[split])

    def _frame_batches(self, frame_ids: Sequence[int]) -> Iterator[Batch]:
        for frame_id in frame_ids:
            sample = self._sample(frame_id)
            batch = {k: v.unsqueeze(0) for k, v in sample.items()}
            del sample
            yield batch
            del batch

    def dataset(self, split: str) -> Dataset[Batch]:
        """Map-style dataset of one split (``"train"``, ``"val"`` or ``"test"``).

        Args:
            split: Split name.

        Returns:
            Dataset whose items are single-frame sample dicts.
        """
        self._require_setup()
        if split not in self.splits:
            raise DataValidationError(
                f"unknown split {split!r}. Fix: use one of {list(self.splits)}."
            )
        return _FrameDataset(self.splits[split], self._sample)

    def _loader(self, split: str, shuffle: bool) -> DataLoader[Batch]:
        self._require_setup()
        dataset = self.dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.splits[split]), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self._collate,
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        """Training batches, shuffled by a generator seeded with ``seed``."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        """Validation batches in the order of ``val_ids``."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[Batch]:
        """Test batches in the order of ``test_ids``."""
        return self._loader("test", shuffle=False)

    # ------------------------------------------------------------------ reporting
    @property
    def num_frames(self) -> int:
        """Frames available across ``paths`` (after ``setup``)."""
        self._require_setup()
        return len(self._index)

    @property
    def num_channels(self) -> int:
        """Bands per frame (after ``setup``)."""
        self._require_setup()
        assert self._summaries is not None
        return int(self._summaries["channels"].iloc[0])

    def frame_summaries(self) -> pd.DataFrame:
        """The validated per-frame summary table (one row per frame used by any split)."""
        self._require_setup()
        assert self._summaries is not None
        return self._summaries.copy()

    def describe(self) -> dict[str, Any]:
        """Small JSON-friendly description for logging (frame counts, shape, dtype, cache)."""
        self._require_setup()
        assert self._summaries is not None
        s = self._summaries
        return {
            "sources": [str(p) for p in self.paths],
            "annotation_path": str(self.annotation_path) if self.annotation_path else None,
            "num_frames": len(self._index),
            "frames_used": len(s),
            "splits": {k: list(v) for k, v in self.splits.items()},
            "shape": [
                int(s["height"].iloc[0]),
                int(s["width"].iloc[0]),
                int(s["channels"].iloc[0]),
            ],
            "cube_dtype": "float32",
            "source_dtype_kinds": sorted(set(s["dtype_kind"])),
            "anomaly_pixels": int(s["n_anomaly"].sum()),
            "has_class_mask": self._with_class_mask,
            "batch_size": self.batch_size,
            "cached_frames": len(self._cache) if self._memory_frames is None else len(s),
            "cached_bytes": self._cached_bytes,
            "cache_bytes": self.cache_bytes,
        }


class SingleCu3sDataModule(CubeDataModule):
    """One multi-frame session file plus its optional COCO annotation file, split by frame index.

    The file is a Cubert ``.cu3s`` session (read through Cubert's SDK where it is installed) or
    its SDK-free stand-in, a multi-frame ``.npz`` export (``cube`` (N, H, W, C), ``mask``,
    ``class_mask``; see :mod:`nodes.data.readers` and ``scripts/build_session_npz.py``).

    Args:
        cu3s_file_path: The session file (frame ids = measurement / frame indices).
        annotation_json_path: COCO JSON whose ``image_id`` is the measurement index (or None).
        train_ids: Training frame ids.
        val_ids: Validation frame ids.
        test_ids: Test frame ids.
        batch_size: Frames per batch.
        **kwargs: Passed on to :class:`CubeDataModule` (num_workers, expected_channels,
            cache_bytes, normal_class_ids, seed).
    """

    def __init__(
        self,
        cu3s_file_path: str | Path,
        annotation_json_path: str | Path | None,
        train_ids: Sequence[int],
        val_ids: Sequence[int],
        test_ids: Sequence[int],
        batch_size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            paths=[cu3s_file_path],
            train_ids=train_ids,
            val_ids=val_ids,
            test_ids=test_ids,
            batch_size=batch_size,
            annotation_path=annotation_json_path,
            **kwargs,
        )
        self.cu3s_file_path = Path(cu3s_file_path)
        self.annotation_json_path = (
            Path(annotation_json_path) if annotation_json_path is not None else None
        )
