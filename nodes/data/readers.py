"""Readers for hyperspectral frames: MATLAB ``.mat`` scenes, Cubert ``.npz`` exports, ``.cu3s``.

Every reader returns :class:`Frame` objects with the cube as float32 ``(H, W, C)`` and a boolean
anomaly mask ``(H, W)``. Readers parse and check *structure* (file present, parseable, expected
keys, array ranks); *content* (non-finite pixels, mask/cube shape agreement, channel counts) is
checked in one place for every input path by the pandera schemas in :mod:`nodes.data.schemas`,
which :func:`read_frames` runs unless told not to.

Formats:

- ``.mat`` (MATLAB v5, as the ABU benchmark ships it; Kang et al., IEEE TGRS 55(10), 2017):
  keys ``data`` (H, W, C integer counts) and ``map`` (H, W; 1 = anomaly). One frame per file.
- ``.npz`` (Cubert's SDK-free export, one frame per file): ``cube`` (H, W, C) float32,
  ``wavelengths`` (C,) int, ``mask`` (H, W) int, ``class_mask`` (H, W) uint8.
- multi-frame ``.npz`` (a whole session in one file, the SDK-free stand-in for a ``.cu3s``):
  the same keys with a leading frame axis, ``cube`` (N, H, W, C), ``mask`` / ``class_mask``
  (N, H, W), ``wavelengths`` (C,) shared or (N, C); optional ``frame_names`` (N,) str.
  ``scripts/build_session_npz.py`` writes the bundled session in this form.
- ``.cu3s`` (Cubert session, many measurements): read through Cubert's ``cuvis`` SDK, imported
  only when such a file is read, since it needs Cubert's native library.

Why one module of over 400 lines: the readers share one error vocabulary (file, field, fix), one
:class:`Frame` type and one dispatch by suffix; the byte-level pieces that stand alone (reading an
``.npz`` member in place, collation, read-ahead) already live in their own modules.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nodes.data.npz_member import read_member as _read_member
from nodes.data.npz_member import read_verified as _read_verified
from nodes.errors import DataValidationError

SUPPORTED_SUFFIXES: tuple[str, ...] = (".mat", ".npz", ".cu3s")

MAT_KEYS: tuple[str, ...] = ("data", "map")
NPZ_REQUIRED_KEYS: tuple[str, ...] = ("cube", "mask")
NPZ_OPTIONAL_KEYS: tuple[str, ...] = ("wavelengths", "class_mask")

_CUVIS_MISSING_FIX = (
    "Fix: `pip install cuvis` and install Cubert's native SDK (libcuvis, from Cubert), "
    "or export the session to one .npz per frame (keys cube, wavelengths, mask, class_mask) "
    "with Cubert's tools and pass those files instead."
)


@dataclass(eq=False)
class Frame:
    """One hyperspectral frame as read from a file.

    Attributes:
        cube: Radiance/reflectance cube, float32, shape (H, W, C).
        mask: Anomaly mask, bool, shape (H, W); True marks an anomalous pixel.
        wavelengths: Band centre wavelengths (nm), float32 (C,), or None when the file has none.
        class_mask: Per-pixel class ids, int64 (H, W), or None when the file has none.
        source: File the frame came from (``Path("<memory>")`` for in-memory arrays).
        index: Index of the frame within ``source`` (0 for single-frame files).
        raw_dtype: Dtype of the cube as stored in the file, before conversion to float32.
        labelled: False when the file carries no labels (the mask is then all False).
    """

    cube: np.ndarray
    mask: np.ndarray
    wavelengths: np.ndarray | None
    class_mask: np.ndarray | None
    source: Path
    index: int = 0
    raw_dtype: str = "float32"
    labelled: bool = True

    def __post_init__(self) -> None:
        # Ranks are checked here so every later consumer (summary, collate) can rely on them;
        # shape agreement between arrays is the schema's job, so it can report all frames.
        for name, ndim in (("cube", 3), ("mask", 2), ("class_mask", 2), ("wavelengths", 1)):
            arr = getattr(self, name)
            if arr is not None and np.ndim(arr) != ndim:
                raise DataValidationError(
                    f"{self.source} (frame {self.index}): field {name!r} has shape "
                    f"{np.shape(arr)}; expected rank {ndim}. Fix: pass cube (H, W, C), mask and "
                    "class_mask (H, W), wavelengths (C,)."
                )

    @property
    def nbytes(self) -> int:
        """Bytes held by this frame's arrays (what the datamodule's cache budget counts)."""
        total = self.cube.nbytes + self.mask.nbytes
        if self.wavelengths is not None:
            total += self.wavelengths.nbytes
        if self.class_mask is not None:
            total += self.class_mask.nbytes
        return int(total)

    def summary(self, frame_id: int | None = None) -> dict[str, Any]:
        """One row of the per-frame summary table validated by :mod:`nodes.data.schemas`.

        Args:
            frame_id: Global frame id within a data module; defaults to ``index``.

        Returns:
            A flat dict of Python scalars (file, ids, shapes, dtype kind, non-finite count...).
        """
        height, width, channels = (int(n) for n in self.cube.shape)
        finite = np.isfinite(self.cube)
        n_nonfinite = int(finite.size - np.count_nonzero(finite))
        first = ""
        if n_nonfinite:
            # argmax over the flattened complement finds the first offender in one pass.
            flat = int(np.argmax(~finite.reshape(-1)))
            loc = np.unravel_index(flat, self.cube.shape)
            first = ", ".join(
                f"{axis}={int(i)}" for axis, i in zip(("row", "col", "band"), loc, strict=True)
            )
        class_shape = self.class_mask.shape if self.class_mask is not None else (0, 0)
        return {
            "file": str(self.source),
            "frame_id": int(self.index if frame_id is None else frame_id),
            "index_in_file": int(self.index),
            "height": height,
            "width": width,
            "channels": channels,
            "dtype_kind": np.dtype(self.raw_dtype).kind,
            "n_nonfinite": n_nonfinite,
            "first_nonfinite": first,
            "mask_height": int(self.mask.shape[0]),
            "mask_width": int(self.mask.shape[1]),
            "class_mask_height": int(class_shape[0]),
            "class_mask_width": int(class_shape[1]),
            "n_wavelengths": int(self.wavelengths.size) if self.wavelengths is not None else 0,
            "n_anomaly": int(np.count_nonzero(self.mask)),
            "labelled": bool(self.labelled),
        }


def _missing_file_error(path: Path) -> DataValidationError:
    return DataValidationError(
        f"{path}: file not found. Fix: check the path; for the bundled scenes under data/, "
        "run `dvc pull` in the repository root to restore them."
    )


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataValidationError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}. Fix: pass a "
            f"{', '.join(SUPPORTED_SUFFIXES)} file (MATLAB v5 scene, Cubert .npz export, or "
            "Cubert session)."
        )
    return suffix


def _as_numeric_array(value: Any, path: Path, key: str, ndim: int, fix: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "uifb":
        raise DataValidationError(
            f"{path}: field {key!r} has non-numeric dtype {arr.dtype}. Fix: {fix}"
        )
    if arr.ndim != ndim:
        raise DataValidationError(
            f"{path}: field {key!r} has shape {arr.shape} (rank {arr.ndim}); expected rank "
            f"{ndim}. Fix: {fix}"
        )
    return arr


def _to_mask(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        values = np.unique(arr)
        if not np.all(np.isin(values, (0.0, 1.0))):
            raise DataValidationError(
                f"{path}: field {key!r} is a float mask with values other than 0 and 1 "
                f"(e.g. {values[~np.isin(values, (0.0, 1.0))][:3].tolist()}). Fix: store the "
                "mask as integers or booleans, 1 = anomaly, 0 = background."
            )
    return np.asarray(arr != 0, dtype=bool)


def _cube_to_float32(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_mat(path: str | Path) -> Frame:
    """Read one ABU-style MATLAB v5 scene (keys ``data`` and ``map``).

    Args:
        path: ``.mat`` file.

    Returns:
        The frame; ``class_mask`` is the ``map`` as int64 (0 = background, 1 = anomaly).

    Raises:
        DataValidationError: File missing, unreadable, truncated, v7.3/HDF5, or wrong keys.
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    try:
        content = scipy.io.loadmat(str(path))
    except NotImplementedError as exc:  # scipy's signal for MATLAB v7.3 (HDF5) files
        raise DataValidationError(
            f"{path}: MATLAB v7.3 (HDF5) files are not supported ({exc}). Fix: re-save it in "
            "MATLAB as v7 (`save(file, 'data', 'map', '-v7')`)."
        ) from exc
    except Exception as exc:  # scipy raises ValueError/OSError/MatReadError/zlib.error/...
        raise DataValidationError(
            f"{path}: cannot parse the MATLAB file ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt. Fix: restore the file (`dvc pull` for bundled data) or "
            "re-export it as MATLAB v5 with keys 'data' and 'map'."
        ) from exc
    found = sorted(k for k in content if not k.startswith("__"))
    missing = [k for k in MAT_KEYS if k not in content]
    if missing:
        raise DataValidationError(
            f"{path}: missing field(s) {missing}; keys found: {found}; expected keys: "
            f"{list(MAT_KEYS)} (data = H x W x bands cube, map = H x W anomaly map). Fix: "
            "re-save the scene with those variable names."
        )
    fix = "store 'data' as an H x W x bands numeric array and 'map' as an H x W 0/1 array."
    data = _as_numeric_array(content["data"], path, "data", 3, fix)
    label = _as_numeric_array(content["map"], path, "map", 2, fix)
    return Frame(
        cube=_cube_to_float32(data),
        mask=_to_mask(label, path, "map"),
        wavelengths=None,
        class_mask=np.asarray(label, dtype=np.int64) if label.dtype.kind in "uib" else None,
        source=path,
        index=0,
        raw_dtype=str(data.dtype),
    )


def _load_npz(path: Path, require_labels: bool) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays of an ``.npz`` export (single- or multi-frame) and whether it has labels."""
    if not path.is_file():
        raise _missing_file_error(path)
    corrupt_fix = (
        "it is truncated or corrupt. Fix: re-export the frame with Cubert's tools (keys cube, "
        "wavelengths, mask, class_mask), or restore it (`dvc pull` for bundled data)."
    )
    keys = ("cube", "mask", "class_mask", "wavelengths")
    try:  # a re-read of a verified version: straight from the recorded member layouts
        cached = _read_verified(path, keys)
    except (ValueError, OSError, EOFError, MemoryError):
        cached = None  # read it through NumPy below, which reports what is wrong
    if cached is not None:
        arrays, names = cached
        has_labels = "mask" in names or "class_mask" in names
        if "cube" in names and (has_labels or not require_labels):
            return arrays, has_labels
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # BadZipFile, ValueError, OSError, EOFError ...
        raise DataValidationError(
            f"{path}: cannot open as .npz ({type(exc).__name__}: {exc}); {corrupt_fix}"
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataValidationError(
            f"{path}: holds a single array, not an .npz archive of named arrays; expected keys "
            f"{list(NPZ_REQUIRED_KEYS)} plus optional {list(NPZ_OPTIONAL_KEYS)}. Fix: save with "
            "np.savez(path, cube=..., mask=..., wavelengths=..., class_mask=...)."
        )
    with npz:
        found = sorted(npz.files)
        has_labels = "mask" in npz.files or "class_mask" in npz.files
        if "cube" not in npz.files or (require_labels and not has_labels):
            missing = [k for k in NPZ_REQUIRED_KEYS if k not in npz.files]
            raise DataValidationError(
                f"{path}: missing field(s) {missing}; keys found: {found}; expected keys: "
                f"{list(NPZ_REQUIRED_KEYS)} plus optional {list(NPZ_OPTIONAL_KEYS)} (a "
                "class_mask alone also gives the mask). Fix: re-export with those keys, or "
                "supply labels through a COCO annotation file."
            )
        try:
            arrays = {k: _read_member(path, npz, k) for k in keys if k in npz}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, MemoryError) as exc:
            raise DataValidationError(
                f"{path}: cannot read the arrays ({type(exc).__name__}: {exc}); {corrupt_fix}"
            ) from exc
    return arrays, has_labels


def _npz_frame(path: Path, arrays: dict[str, np.ndarray], has_labels: bool,
               index: int | None) -> Frame:
    """Frame ``index`` of a multi-frame export's arrays, or the frame of a single-frame one."""
    multi = index is not None
    lead = "(N, H, W, C)" if multi else "(H, W, C)"
    fix = (f"cube must be {lead} numeric, mask and class_mask {lead[:-4]}) integer, "
           "wavelengths (C,)" + (" or (N, C)." if multi else "."))
    off = 1 if multi else 0

    def pick(key: str, ndim: int) -> np.ndarray:
        arr = _as_numeric_array(arrays[key], path, key, ndim + off, fix)
        return arr[index] if multi else arr

    cube = pick("cube", 3)
    class_mask = pick("class_mask", 2) if "class_mask" in arrays else None
    if "mask" in arrays:
        mask = _to_mask(pick("mask", 2), path, "mask")
    elif class_mask is not None:
        mask = class_mask != 0
    else:
        mask = np.zeros(cube.shape[:2], dtype=bool)
    wavelengths = None
    if "wavelengths" in arrays:
        wl = np.asarray(arrays["wavelengths"])
        if multi and wl.ndim == 2:
            wl = wl[index]
        wavelengths = np.asarray(
            _as_numeric_array(wl, path, "wavelengths", 1, fix), dtype=np.float32
        )
    return Frame(
        cube=_cube_to_float32(cube),
        mask=mask,
        wavelengths=wavelengths,
        class_mask=None if class_mask is None else np.asarray(class_mask, dtype=np.int64),
        source=path,
        index=0 if index is None else index,
        raw_dtype=str(cube.dtype),
        labelled=has_labels,
    )


def _npz_frame_count(path: Path, arrays: dict[str, np.ndarray]) -> int | None:
    """Frames of a multi-frame export (rank-4 cube), None for a single-frame one."""
    ndim = np.ndim(arrays["cube"])
    if ndim == 4:
        n = int(np.shape(arrays["cube"])[0])
        for key in ("mask", "class_mask"):
            if key in arrays and (np.ndim(arrays[key]) != 3 or np.shape(arrays[key])[0] != n):
                raise DataValidationError(
                    f"{path}: a multi-frame export has cube {np.shape(arrays['cube'])} but "
                    f"{key} {np.shape(arrays[key])}. Fix: give {key} one (H, W) plane per frame, "
                    "shape (N, H, W)."
                )
        return n
    return None


def read_npz(path: str | Path, require_labels: bool = True) -> Frame:
    """Read one Cubert SDK-free ``.npz`` export (cube, wavelengths, mask, class_mask).

    Args:
        path: ``.npz`` file.
        require_labels: If False, a file without ``mask`` and ``class_mask`` is accepted (its
            frame is marked unlabelled; labels then come from a COCO annotation file).

    Returns:
        The frame. Without ``mask`` but with ``class_mask``, the mask is ``class_mask != 0``.
        For a multi-frame export, its first frame (see :func:`iter_frames_at`).

    Raises:
        DataValidationError: File missing, not a valid zip/npz, truncated member, or wrong keys.
    """
    path = Path(path)
    arrays, has_labels = _load_npz(path, require_labels)
    n = _npz_frame_count(path, arrays)
    return _npz_frame(path, arrays, has_labels, None if n is None else 0)


def _npz_member_shape(path: Path, key: str) -> tuple[int, ...] | None:
    """Shape of one array of an ``.npz`` from its header alone (None where unreadable)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(fh)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError):
        return None
    return tuple(int(d) for d in shape)


def _import_cuvis(path: Path) -> Any:
    try:
        import cuvis
    except (ImportError, OSError) as exc:  # OSError: the binding found no libcuvis
        raise DataValidationError(
            f"{path}: reading .cu3s needs Cubert's SDK, which is not importable here "
            f"({exc}). {_CUVIS_MISSING_FIX}"
        ) from exc
    return cuvis


def _open_session(path: Path) -> Any:
    if not path.is_file():
        raise _missing_file_error(path)
    cuvis = _import_cuvis(path)
    try:
        return cuvis.SessionFile(str(path))
    except Exception as exc:  # cuvis raises its own SDKException for unreadable sessions
        raise DataValidationError(
            f"{path}: Cubert's SDK cannot open the session ({type(exc).__name__}: {exc}); it "
            "is truncated, corrupt or from an incompatible SDK version. Fix: re-record or "
            "re-export the session, or export it to .npz with Cubert's tools."
        ) from exc


def _cu3s_frame(session: Any, path: Path, index: int) -> Frame:
    try:
        measurement = session.get_measurement(index)
    except Exception as exc:
        raise DataValidationError(
            f"{path}: measurement {index} cannot be read ({type(exc).__name__}: {exc}). Fix: "
            "check the session in Cubert's tools, or drop that frame id from the splits."
        ) from exc
    if measurement is None:
        raise DataValidationError(
            f"{path}: measurement {index} is missing from the session (a gap). Fix: drop that "
            "frame id from the splits."
        )
    data = getattr(measurement, "data", {})
    if "cube" not in data:
        raise DataValidationError(
            f"{path}: measurement {index} has no field 'cube'; fields found: "
            f"{sorted(data)}. Fix: process the session to cubes (cuvis ProcessingContext, "
            "e.g. reflectance mode) and save it, or export processed frames to .npz."
        )
    image = data["cube"]
    cube = _as_numeric_array(
        image.array, path, f"measurement {index} cube", 3, "the SDK must return (H, W, C)."
    )
    wavelength = getattr(image, "wavelength", None)
    return Frame(
        cube=_cube_to_float32(cube),
        mask=np.zeros(cube.shape[:2], dtype=bool),
        wavelengths=None if wavelength is None else np.asarray(wavelength, dtype=np.float32),
        class_mask=None,
        source=path,
        index=index,
        raw_dtype=str(cube.dtype),
        labelled=False,
    )


def iter_cu3s(path: str | Path) -> Iterator[Frame]:
    """Yield every measurement of a Cubert ``.cu3s`` session as an (unlabelled) frame.

    Uses the ``cuvis`` Python API: ``SessionFile(path)``, ``len(session)``,
    ``session.get_measurement(i)``, ``measurement.data["cube"].array`` (H, W, C) and
    ``.wavelength`` (nm per band). Labels come from the session's COCO annotation file.

    Args:
        path: ``.cu3s`` file.

    Yields:
        One frame per measurement, ``index`` = measurement number.

    Raises:
        DataValidationError: SDK not installed, session unreadable, measurement without cube.
    """
    path = Path(path)
    session = _open_session(path)
    for i in range(len(session)):
        yield _cu3s_frame(session, path, i)


def count_frames(path: str | Path) -> int:
    """Number of frames in a file without reading the cubes (1 for ``.mat``/``.npz``).

    Args:
        path: A supported file.

    Returns:
        Frame count.

    Raises:
        DataValidationError: File missing, unsupported suffix, or (``.cu3s``) SDK missing.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if not path.is_file():
        raise _missing_file_error(path)
    if suffix == ".cu3s":
        return len(_open_session(path))
    if suffix == ".npz":
        shape = _npz_member_shape(path, "cube")
        return shape[0] if shape is not None and len(shape) == 4 else 1
    return 1


def read_frame(path: str | Path, index: int = 0, require_labels: bool = True) -> Frame:
    """Read the frame number ``index`` of a file (structure checks only, no content validation).

    Args:
        path: A supported file.
        index: Frame within the file; must be 0 for single-frame files.
        require_labels: Passed to :func:`read_npz`.

    Returns:
        The frame.

    Raises:
        DataValidationError: As the format readers, or ``index`` out of range.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if suffix in (".cu3s", ".npz"):
        return next(iter_frames_at(path, [index], require_labels=require_labels))
    if index != 0:
        raise DataValidationError(
            f"{path}: frame index {index} out of range; a {suffix} file holds one frame "
            "(valid 0). Fix: use index 0."
        )
    if suffix == ".mat":
        return read_mat(path)
    return read_npz(path, require_labels=require_labels)


def iter_frames_at(
    path: str | Path, indices: Iterable[int], require_labels: bool = True
) -> Iterator[Frame]:
    """Yield the frames ``indices`` of one file, opening a ``.cu3s`` session only once.

    Args:
        path: A supported file.
        indices: Frame indices within the file, in the order wanted.
        require_labels: Passed to :func:`read_npz`.

    Yields:
        The frames, in the order of ``indices``.

    Raises:
        DataValidationError: As :func:`read_frame`.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if suffix == ".npz":  # one read of the archive for all the frames asked for
        arrays, has_labels = _load_npz(path, require_labels)
        n = _npz_frame_count(path, arrays)
        for index in indices:
            if not 0 <= index < (n or 1):
                valid = f"0..{n - 1}" if n else "0"
                raise DataValidationError(
                    f"{path}: frame index {index} out of range; the file holds {n or 1} "
                    f"frame(s) (valid {valid}). Fix: use an index in that range."
                )
            yield _npz_frame(path, arrays, has_labels, None if n is None else index)
        return
    if suffix != ".cu3s":
        for index in indices:
            yield read_frame(path, index, require_labels=require_labels)
        return
    session = _open_session(path)
    n = len(session)
    for index in indices:
        if not 0 <= index < n:
            raise DataValidationError(
                f"{path}: frame index {index} out of range; the session holds {n} "
                f"measurement(s) (valid 0..{n - 1}). Fix: use an index in that range."
            )
        yield _cu3s_frame(session, path, index)


def iter_frames(path: str | Path, require_labels: bool = True) -> Iterator[Frame]:
    """Yield the frames of a file one at a time (memory stays at one frame for ``.cu3s``).

    Args:
        path: A supported file.
        require_labels: Passed to :func:`read_npz`.

    Yields:
        Frames in file order.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if suffix == ".cu3s":
        yield from iter_cu3s(path)
    elif suffix == ".npz":
        yield from iter_frames_at(path, range(count_frames(path)), require_labels=require_labels)
    else:
        yield read_frame(path, 0, require_labels=require_labels)


def read_frames(
    path: str | Path, validate: bool = True, expected_channels: int | None = None
) -> list[Frame]:
    """Read every frame of a file, dispatching on the suffix (``.mat``, ``.npz``, ``.cu3s``).

    Args:
        path: A supported file.
        validate: Run the pandera frame schema (finite pixels, mask shape, channels...).
        expected_channels: If given, every frame must have this many bands.

    Returns:
        The frames, in file order.

    Raises:
        DataValidationError: Any structural or (with ``validate``) content problem; the
            message names the file, the field and the fix.
    """
    frames = list(iter_frames(path))
    if validate:
        from nodes.data.schemas import validate_frames

        validate_frames([f.summary() for f in frames], expected_channels=expected_channels)
    return frames


def write_session_npz(frames: Sequence[Frame], path: str | Path, *,
                      frame_names: Sequence[str] | None = None, compress: bool = True) -> Path:
    """Write frames of one sensor as a multi-frame ``.npz`` session (the reader's format).

    Keys: ``cube`` (N, H, W, C) float32, ``mask`` (N, H, W) uint8, ``class_mask`` (N, H, W)
    int64 where every frame has one, ``wavelengths`` (C,) where the frames share them, and
    ``frame_names`` (N,). Written to a temporary name and renamed, so a failure leaves no file.

    Args:
        frames: The frames, in frame-id order; all of one shape.
        path: Target ``.npz`` file.
        frame_names: One name per frame (default: ``<source file name>#<index>``).
        compress: Deflate the arrays (smaller file, slower read).

    Returns:
        The path written.

    Raises:
        DataValidationError: No frames, frames of different shapes, or a name count mismatch.
    """
    path = Path(path)
    if not frames:
        raise DataValidationError(f"{path}: no frames to write. Fix: pass at least one frame.")
    shapes = sorted({tuple(f.cube.shape) for f in frames})
    if len(shapes) > 1:
        raise DataValidationError(
            f"{path}: frames of different shapes {shapes} cannot share one session file. Fix: "
            "write frames of one sensor and size."
        )
    names = [f"{f.source.name}#{f.index}" for f in frames] if frame_names is None else list(
        frame_names)
    if len(names) != len(frames):
        raise DataValidationError(
            f"{path}: {len(names)} frame_names for {len(frames)} frames. Fix: one name per frame."
        )
    arrays: dict[str, np.ndarray] = {
        "cube": np.stack([f.cube for f in frames]).astype(np.float32, copy=False),
        "mask": np.stack([f.mask for f in frames]).astype(np.uint8),
        "frame_names": np.asarray(names, dtype=str),
    }
    if all(f.class_mask is not None for f in frames):
        arrays["class_mask"] = np.stack([np.asarray(f.class_mask) for f in frames])
    wls = [f.wavelengths for f in frames]
    first = wls[0]
    if first is not None and all(w is not None and np.array_equal(w, first) for w in wls):
        arrays["wavelengths"] = np.asarray(first, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        if compress:
            np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
        else:
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
