"""Data versions: new frames in, one content-addressed, DVC-versioned folder per version.

A *data version* is a folder ``frames/<file>`` (+ ``labels.json`` for COCO annotations) and a
manifest ``cubeline-data.json`` that records the frame order and the explicit train / val / test
frame ids. It is stored with :func:`tasks.versioning.store_tree` as one DVC tree object: its hash
``<md5>.dir`` *is* the version (same frames, labels and split: same hash), it is pushed to the
repository's DVC remote and can be checked out by hash on another machine
(:func:`restore_data_version`). No ``.dvc`` file is written, so ingesting never changes the git
tree: the hash travels in MLflow tags, event payloads and flow parameters.

Ingestion validates every frame before anything is stored (pandera through
:class:`~nodes.data.datamodule.CubeDataModule`: finite pixels, band count of ``params.yaml``
``data.expected_channels``, mask shapes, COCO geometry), and refuses a split whose validation or
test frames hold no labelled anomaly (the threshold calibration and the gate need them). A
failed ingestion leaves nothing behind: the staging folder is removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodes.errors import ConfigError, CubelineError, DataValidationError
from tasks.versioning import check_tree_hash, restore_tree, store_tree

log = logging.getLogger(__name__)

MANIFEST = "cubeline-data.json"
FRAMES_DIR = "frames"
LABELS_FILE = "labels.json"
FORMAT = 1
SUFFIXES = (".mat", ".npz", ".cu3s")


@dataclass(frozen=True)
class Split:
    """Frame ids of the three splits of a data version."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


@dataclass(frozen=True)
class DataVersionInfo:
    """A data version, checked out.

    Attributes:
        version: DVC hash of the version's folder (``<md5>.dir``).
        path: The checked-out folder.
        files: Frame files (absolute, inside ``path``), in frame-id order.
        split: Train / val / test frame ids.
        annotation: COCO file inside ``path``, or None when the frames carry their masks.
        frame_names: ``<file>#<index>`` per frame id.
        channels: Bands per frame.
        parents: Versions this one was built from (``old + new`` retraining), else empty.
    """

    version: str
    path: Path
    files: tuple[str, ...]
    split: Split
    annotation: str | None
    frame_names: tuple[str, ...]
    channels: int
    parents: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def default_split(num_frames: int, val_frames: int = 1, test_frames: int = 1) -> Split:
    """The last ``test_frames`` frames test, the ``val_frames`` before them val, the rest train.

    Raises:
        ConfigError: Fewer frames than the three splits need.
    """
    if num_frames < val_frames + test_frames + 1:
        raise ConfigError(
            f"{num_frames} frame(s) cannot be split into train / val ({val_frames}) / test "
            f"({test_frames}); ingest at least {val_frames + test_frames + 1} frames or pass "
            "--train/--val/--test ids (params.yaml ingest.val_frames / ingest.test_frames)"
        )
    n_train = num_frames - val_frames - test_frames
    return Split(
        tuple(range(n_train)),
        tuple(range(n_train, n_train + val_frames)),
        tuple(range(n_train + val_frames, num_frames)),
    )


def _check_split(split: Split, num_frames: int) -> None:
    seen: dict[int, str] = {}
    for name, ids in (("train", split.train), ("val", split.val), ("test", split.test)):
        if not ids:
            raise ConfigError(f"split: {name} ids are empty; every split needs a frame")
        for i in ids:
            if not 0 <= i < num_frames:
                raise ConfigError(
                    f"split: {name} id {i} is out of range (the version has {num_frames} frames, "
                    f"ids 0..{num_frames - 1})"
                )
            if i in seen:
                raise ConfigError(f"split: frame id {i} is in both {seen[i]} and {name}")
            seen[i] = name


def ingest_frames(
    files: Sequence[str | Path],
    *,
    root: Path,
    remote: str | None,
    versions_dir: Path,
    expected_channels: int | None,
    normal_class_ids: Sequence[int] = (0,),
    labels: str | Path | None = None,
    split: Split | None = None,
    val_frames: int = 1,
    test_frames: int = 1,
    parents: Sequence[str] = (),
) -> DataVersionInfo:
    """Validate frames and store them as a new data version (DVC tree, pushed to ``remote``).

    Args:
        files: Frame files (``.mat``, ``.npz``, ``.cu3s``), in frame order.
        root: Repository root (the DVC repository).
        remote: DVC remote (``params.yaml`` ``dvc.remote``).
        versions_dir: Where versions are checked out (``<md5>/``).
        expected_channels: Band count every frame must have (None: any, but all equal).
        normal_class_ids: Classes that count as normal when masks come from ``labels``.
        labels: COCO JSON whose ``image_id`` is the frame id in this version (None: the files
            carry their masks).
        split: Explicit split (None: :func:`default_split`).
        val_frames: Validation frames of the default split.
        test_frames: Test frames of the default split.
        parents: Versions this one combines (recorded in the manifest).

    Returns:
        The stored, checked-out version.

    Raises:
        DataValidationError: A file is missing, has an unsupported suffix or fails validation
            (the message names the file, the field and the fix), or a val/test frame holds no
            labelled anomaly.
        ConfigError: Bad split, two files with one name, or the push fails.
    """
    from nodes.data.datamodule import CubeDataModule
    from nodes.data.readers import count_frames

    paths = [Path(f).resolve() for f in files]
    if not paths:
        raise ConfigError("ingest: no frame files given")
    for p in paths:
        if p.suffix.lower() not in SUFFIXES:
            raise DataValidationError(
                f"{p}: unsupported frame file (suffix {p.suffix!r}); give .mat, .npz or .cu3s"
            )
        if not p.is_file():
            raise DataValidationError(f"{p}: no such frame file; check the path")
    names = [p.name for p in paths]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(
            f"ingest: several files are named {clash}; rename them (a version stores frames by "
            "file name)"
        )
    versions_dir.mkdir(parents=True, exist_ok=True)
    staging = versions_dir / f".ingest-{uuid.uuid4().hex}"
    try:
        frames_dir = staging / FRAMES_DIR
        frames_dir.mkdir(parents=True)
        staged = []
        for p in paths:
            dst = frames_dir / p.name
            shutil.copyfile(p, dst)
            staged.append(dst)
        label_path = None
        if labels is not None:
            src = Path(labels).resolve()
            if not src.is_file():
                raise DataValidationError(f"{src}: no such COCO annotation file; check --labels")
            label_path = staging / LABELS_FILE
            shutil.copyfile(src, label_path)
        frame_names = tuple(
            f"{p.name}#{i}" for p in staged for i in range(count_frames(p))
        )
        split = split or default_split(len(frame_names), val_frames, test_frames)
        _check_split(split, len(frame_names))
        dm = CubeDataModule(
            staged,
            list(split.train),
            list(split.val),
            list(split.test),
            batch_size=1,
            annotation_path=label_path,
            expected_channels=expected_channels,
            normal_class_ids=list(normal_class_ids),
        )
        try:
            dm.setup("fit")
        except CubelineError as exc:
            raise _named_by_source(exc, staged, paths, label_path, labels) from None
        _require_anomalies(dm, split, frame_names, paths)
        channels = int(dm.describe()["shape"][2])
        manifest = {
            "format": FORMAT,
            "frames": [f"{FRAMES_DIR}/{p.name}" for p in staged],
            "frame_names": list(frame_names),
            "split": {"train": list(split.train), "val": list(split.val), "test": list(split.test)},
            "annotation": LABELS_FILE if label_path is not None else None,
            "channels": channels,
            "parents": list(parents),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        version = store_tree(staging, root=root, remote=remote, what="data version")
        target = versions_dir / version.removesuffix(".dir")
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_manifest(target, version)


def _named_by_source(exc: CubelineError, staged: Sequence[Path], sources: Sequence[Path],
                     label_path: Path | None, labels: str | Path | None) -> CubelineError:
    """``exc`` with the staged copies' paths replaced by the files the user gave.

    Frames are validated as staged (so what is checked is exactly what is stored), but the user
    fixes the file they passed, so that is the one the error names.
    """
    text = str(exc)
    pairs = list(zip(staged, sources, strict=True))
    if label_path is not None and labels is not None:
        pairs.append((label_path, Path(labels).resolve()))
    for copy, source in sorted(pairs, key=lambda pair: -len(str(pair[0]))):
        text = text.replace(str(copy), str(source))
    return type(exc)(text)


def _require_anomalies(
    dm: Any, split: Split, names: Sequence[str], paths: Sequence[Path]
) -> None:
    """Val and test frames must hold labelled anomalies (calibration and the gate need them)."""
    for name, ids in (("val", split.val), ("test", split.test)):
        if not any(bool(dm.get_frame(i).mask.any()) for i in ids):
            raise DataValidationError(
                f"ingest: the {name} frames {[names[i] for i in ids]} hold no labelled anomalous "
                f"pixel (files {[str(p) for p in paths]}); the decision threshold and the "
                "promotion gate need labelled anomalies there. Fix: label them (mask / COCO "
                "--labels) or choose other ids with --val/--test"
            )


def read_manifest(path: Path, version: str) -> DataVersionInfo:
    """The :class:`DataVersionInfo` of a checked-out version folder.

    Raises:
        DataValidationError: The manifest is missing or malformed.
    """
    file = path / MANIFEST
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        split = Split(*(tuple(int(i) for i in doc["split"][k]) for k in ("train", "val", "test")))
        files = tuple(str((path / f).resolve()) for f in doc["frames"])
        annotation = str(path / doc["annotation"]) if doc.get("annotation") else None
        info = DataVersionInfo(
            version=version,
            path=path,
            files=files,
            split=split,
            annotation=annotation,
            frame_names=tuple(str(n) for n in doc["frame_names"]),
            channels=int(doc["channels"]),
            parents=tuple(str(p) for p in doc.get("parents", [])),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataValidationError(
            f"{file}: not a cubeline data-version manifest ({type(exc).__name__}: {exc}); "
            f"remove {path} and run again with `--data-version {version}`, which restores it "
            "from the DVC cache or remote"
        ) from None
    outside = [f for f in files if not Path(f).resolve().is_relative_to(path.resolve())]
    if outside:
        raise DataValidationError(f"{file}: frames {outside} lie outside the version folder")
    return info


def restore_data_version(
    version: str, *, root: Path, remote: str | None, versions_dir: Path
) -> DataVersionInfo:
    """Check a data version out by its hash (from the DVC cache, else pulled from the remote).

    Raises:
        ConfigError: Malformed hash, or the version is neither in the cache nor on the remote.
    """
    check_tree_hash(version, "a data-version hash", "`cubeline ingest` output and the MLflow "
                    "tag cubeline.data_hash")
    target = versions_dir / version.removesuffix(".dir")
    restore_tree(version, root=root, remote=remote, target=target, what="data version")
    return read_manifest(target, version)


def combine_versions(
    old: DataVersionInfo,
    new: DataVersionInfo,
    *,
    root: Path,
    remote: str | None,
    versions_dir: Path,
    expected_channels: int | None,
    normal_class_ids: Sequence[int] = (0,),
) -> DataVersionInfo:
    """A version training on ``old``'s and ``new``'s training frames, validated on ``new``.

    Train = both training splits; val and test = ``new``'s (the pinned evaluation frames are the
    newest data). Frames keep their files (deduplicated by the DVC cache: only the manifest is
    new). Versions with COCO labels cannot be combined yet.

    Raises:
        ConfigError: Labels from COCO files, or a file name in both versions with other content.
    """
    if old.annotation or new.annotation:
        raise ConfigError(
            "old + new training needs frames that carry their masks (.mat / .npz); versions "
            "with COCO labels cannot be combined yet: set retrain.on_drift_data: new"
        )
    old_files = [old.files[_file_index(old, i)] for i in old.split.train]
    files = [*dict.fromkeys(old_files), *new.files]
    names = [Path(f).name for f in files]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(
            f"old + new: both versions hold a frame file named {clash[0]!r}; rename the new "
            "frames before ingesting them"
        )
    n_old = len(files) - len(new.files)
    split = Split(
        tuple(range(n_old)) + tuple(n_old + i for i in new.split.train),
        tuple(n_old + i for i in new.split.val),
        tuple(n_old + i for i in new.split.test),
    )
    return ingest_frames(
        files,
        root=root,
        remote=remote,
        versions_dir=versions_dir,
        expected_channels=expected_channels,
        normal_class_ids=normal_class_ids,
        split=split,
        parents=(old.version, new.version),
    )


def _file_index(info: DataVersionInfo, frame_id: int) -> int:
    """Index in ``info.files`` of the file holding ``frame_id`` (single-frame files only)."""
    if len(info.files) != len(info.frame_names):
        raise ConfigError(
            f"data version {info.version} holds multi-frame files; old + new training needs "
            "single-frame files (.mat / .npz): set retrain.on_drift_data: new"
        )
    return frame_id
