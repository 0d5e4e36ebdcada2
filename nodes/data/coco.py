"""COCO annotation JSON → per-frame class masks, without pycocotools.

Cubert sessions ship their labels as COCO JSON (Lin et al., "Microsoft COCO: Common Objects in
Context", ECCV 2014) where ``image_id`` is the frame index within the session. Supported
segmentations:

- polygons (``[[x1, y1, x2, y2, ...], ...]``), rasterized by testing pixel centres
  ``(x + 0.5, y + 0.5)`` with :class:`matplotlib.path.Path`;
- uncompressed RLE (``{"size": [h, w], "counts": [int, ...]}``);
- compressed RLE (``counts`` as a string): the run lengths are written as 5-bit groups in
  printable characters (offset 48, bit 0x20 = "more groups follow", bit 0x10 of the last group
  = sign), and from the third run on each value is stored as the difference to the run two
  places earlier — the scheme of the COCO API's ``maskApi.c``;
- a bare ``bbox`` ``[x, y, w, h]`` as a filled rectangle when no segmentation is given.

RLE runs alternate background/foreground starting with background and walk the image in
column-major (Fortran) order. The class id of a pixel is the annotation's ``category_id``
(0 = background, unannotated); where annotations overlap, the later one in the file wins.

Why one module of about 400 lines: one file format (polygons, both RLE forms, their
validation and error messages) whose parts only make sense together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodes.errors import DataValidationError


def rle_string_to_counts(encoded: str) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths.

    Args:
        encoded: The ``counts`` string.

    Returns:
        Run lengths (background first).

    Raises:
        ValueError: A character outside the alphabet or a truncated group.
    """
    counts: list[int] = []
    pos = 0
    n = len(encoded)
    while pos < n:
        value = 0
        shift = 0
        more = True
        while more:
            if pos >= n:
                raise ValueError(f"truncated run at character {pos}")
            c = ord(encoded[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {encoded[pos]!r} at {pos} is not RLE alphabet")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def counts_to_rle_string(counts: Sequence[int]) -> str:
    """Encode run lengths as COCO's compressed RLE string (inverse of `rle_string_to_counts`).

    Args:
        counts: Run lengths, background first.

    Returns:
        The ``counts`` string.
    """
    out: list[str] = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = value & 0x1F
            value >>= 5  # arithmetic shift: negative values converge to -1
            more = value != -1 if c & 0x10 else value != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """Encode a binary (H, W) mask as a COCO RLE dict.

    Args:
        mask: Binary mask.
        compressed: String ``counts`` (COCO's compressed form) if True, else a list of ints.

    Returns:
        ``{"size": [H, W], "counts": ...}``.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]  # runs must start with background
    counts: list[int] = [int(r) for r in runs] if flat.size else [0]
    return {
        "size": [int(height), int(width)],
        "counts": counts_to_rle_string(counts) if compressed else counts,
    }


def decode_rle(
    rle: Mapping[str, Any], height: int | None = None, width: int | None = None
) -> np.ndarray:
    """Decode a COCO RLE dict (compressed string or uncompressed list) to a bool (H, W) mask.

    Args:
        rle: ``{"size": [H, W], "counts": str | list[int]}``.
        height: Expected height (defaults to ``size[0]``).
        width: Expected width (defaults to ``size[1]``).

    Returns:
        The mask.

    Raises:
        ValueError: Malformed counts, or runs that do not cover H * W pixels, or a size clash.
    """
    size = rle.get("size")
    if size is None:
        if height is None or width is None:
            raise ValueError("RLE has no 'size' and no frame shape was given")
        size = [height, width]
    h, w = int(size[0]), int(size[1])
    if (height is not None and h != height) or (width is not None and w != width):
        raise ValueError(f"RLE size {h} x {w} differs from the frame's {height} x {width}")
    raw = rle.get("counts")
    if isinstance(raw, str):
        counts = rle_string_to_counts(raw)
    elif isinstance(raw, list) and all(isinstance(c, int) for c in raw):
        counts = [int(c) for c in raw]
    else:
        raise ValueError("RLE 'counts' must be a string (compressed) or a list of integers")
    if any(c < 0 for c in counts):
        raise ValueError("RLE has a negative run length")
    if sum(counts) != h * w:
        raise ValueError(f"RLE runs cover {sum(counts)} pixels, the mask has {h} x {w} = {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Fill COCO polygons into a bool (H, W) mask (a pixel is in if its centre is inside).

    Args:
        polygons: Each a flat ``[x1, y1, x2, y2, ...]`` list of at least 3 vertices.
        height: Mask height.
        width: Mask width.

    Returns:
        The mask (union of the polygons).

    Raises:
        ValueError: A polygon with fewer than 3 vertices or an odd number of coordinates.
    """
    from matplotlib.path import Path as MplPath

    mask = np.zeros((height, width), dtype=bool)
    for k, poly in enumerate(polygons):
        coords = np.asarray(poly, dtype=np.float64)
        if coords.ndim != 1 or coords.size % 2 or coords.size < 6:
            raise ValueError(
                f"polygon {k} has {coords.size} coordinates; need an even count >= 6 "
                "(x1, y1, x2, y2, x3, y3, ...)"
            )
        verts = coords.reshape(-1, 2)
        # Only test the pixels of the polygon's bounding box: cheap for small objects.
        x0 = max(int(np.floor(verts[:, 0].min())), 0)
        x1 = min(int(np.ceil(verts[:, 0].max())), width)
        y0 = max(int(np.floor(verts[:, 1].min())), 0)
        y1 = min(int(np.ceil(verts[:, 1].max())), height)
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        centres = np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5])
        inside = MplPath(verts).contains_points(centres).reshape(y1 - y0, x1 - x0)
        mask[y0:y1, x0:x1] |= inside
    return mask


def rasterize_bbox(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
    """Fill a COCO ``[x, y, w, h]`` box (pixels whose centre lies inside).

    Args:
        bbox: Box in pixel coordinates.
        height: Mask height.
        width: Mask width.

    Returns:
        The mask.
    """
    x, y, w, h = (float(v) for v in bbox)
    mask = np.zeros((height, width), dtype=bool)
    c0 = max(int(np.ceil(x - 0.5)), 0)
    c1 = min(int(np.ceil(x + w - 0.5)), width)
    r0 = max(int(np.ceil(y - 0.5)), 0)
    r1 = min(int(np.ceil(y + h - 0.5)), height)
    if c1 > c0 and r1 > r0:
        mask[r0:r1, c0:c1] = True
    return mask


def _segmentation_kind(seg: Any) -> str:
    if isinstance(seg, list):
        return "polygon" if seg else "none"
    if isinstance(seg, Mapping):
        counts = seg.get("counts")
        return "compressed_rle" if isinstance(counts, str) else "rle"
    return "none"


@dataclass
class CocoAnnotations:
    """A parsed COCO annotation file.

    Attributes:
        path: The JSON file.
        categories: Category id → name.
        image_shapes: image_id → (height, width) where the JSON's ``images`` gives them.
        annotations: Raw annotation dicts, in file order.
    """

    path: Path
    categories: dict[int, str]
    image_shapes: dict[int, tuple[int, int]] = field(default_factory=dict)
    annotations: list[dict[str, Any]] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """Annotation summary rows for :func:`nodes.data.schemas.validate_annotations`."""
        rows = []
        for pos, ann in enumerate(self.annotations):
            seg = ann.get("segmentation")
            bbox = ann.get("bbox")
            rows.append(
                {
                    "file": str(self.path),
                    "annotation_id": int(ann.get("id", pos)),
                    "image_id": int(ann["image_id"]),
                    "category_id": int(ann["category_id"]),
                    "has_segmentation": _segmentation_kind(seg) != "none",
                    "has_bbox": isinstance(bbox, list) and len(bbox) == 4,
                }
            )
        return rows

    def validate(self, n_frames: int) -> None:
        """Check every annotation against a session of ``n_frames`` frames (pandera schema).

        Args:
            n_frames: Frames in the session (valid image_id 0..n_frames-1).

        Raises:
            DataValidationError: Naming this JSON file, the annotation, image_id and the fix.
        """
        from nodes.data.schemas import validate_annotations

        validate_annotations(self.rows(), n_frames, self.categories)

    def annotated_frames(self) -> set[int]:
        """Frame indices that carry at least one annotation."""
        return {int(a["image_id"]) for a in self.annotations}

    def class_mask(self, image_id: int, height: int, width: int) -> np.ndarray:
        """Paint the class mask of one frame (0 = background, else ``category_id``).

        Args:
            image_id: Frame index.
            height: Frame height.
            width: Frame width.

        Returns:
            int64 (H, W) class ids.

        Raises:
            DataValidationError: Shape disagreement or a malformed segmentation; names the
                JSON file, annotation id and fix.
        """
        shape = self.image_shapes.get(image_id)
        if shape is not None and shape != (height, width):
            raise DataValidationError(
                f"{self.path}: image_id {image_id} is declared {shape[0]} x {shape[1]} in "
                f"'images', but the frame is {height} x {width}. Fix: annotate the right "
                "session, or correct the image's height/width."
            )
        out = np.zeros((height, width), dtype=np.int64)
        for pos, ann in enumerate(self.annotations):
            if int(ann["image_id"]) != image_id:
                continue
            ann_id = ann.get("id", pos)
            try:
                region = annotation_mask(ann, height, width)
            except ValueError as exc:
                raise DataValidationError(
                    f"{self.path}: annotation id {ann_id} (image_id {image_id}): field "
                    f"'segmentation' is malformed ({exc}). Fix: re-export the annotation "
                    "(polygon list, or RLE with size [H, W] and counts)."
                ) from exc
            out[region] = int(ann["category_id"])
        return out


def annotation_mask(ann: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Rasterize one annotation (polygons, RLE, or bbox fallback) to a bool (H, W) mask.

    Args:
        ann: COCO annotation dict.
        height: Frame height.
        width: Frame width.

    Returns:
        The mask.

    Raises:
        ValueError: Malformed geometry.
    """
    seg = ann.get("segmentation")
    kind = _segmentation_kind(seg)
    if kind == "polygon":
        return rasterize_polygons(seg, height, width)  # type: ignore[arg-type]
    if kind in ("rle", "compressed_rle"):
        return decode_rle(seg, height, width)  # type: ignore[arg-type]
    bbox = ann.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4:
        return rasterize_bbox(bbox, height, width)
    raise ValueError("no segmentation and no bbox")


#: Ids and sizes must fit the int64 tables they are validated in.
_INT_LIMIT = 2**62


def _as_int(value: Any, path: Path, where: str, name: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or int(value) != value):
        raise DataValidationError(
            f"{path}: {where}: field {name!r} = {value!r} is not an integer. Fix: give "
            f"{name} as an integer."
        )
    if abs(int(value)) >= _INT_LIMIT:
        raise DataValidationError(
            f"{path}: {where}: field {name!r} = {value!r} is out of range (|value| < 2^62). "
            f"Fix: give {name} as a frame/category index."
        )
    return int(value)


def _check_geometry(ann: dict[str, Any], path: Path, where: str) -> None:
    """Coordinates of ``bbox`` and polygon ``segmentation`` are finite numbers."""
    seg = ann.get("segmentation")
    parts: list[tuple[str, Any]] = [("bbox", ann["bbox"])] if "bbox" in ann else []
    if isinstance(seg, list):
        parts += [(f"segmentation[{i}]", poly) for i, poly in enumerate(seg)]
    for name, coords in parts:
        values = coords if isinstance(coords, list) else [coords]
        for v in values:
            if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                    or abs(v) > _INT_LIMIT):
                raise DataValidationError(
                    f"{path}: {where}: {name} holds {v!r}, not a finite pixel coordinate. Fix: "
                    "re-export the annotation with numeric, finite coordinates."
                )


def load_coco(path: str | Path) -> CocoAnnotations:
    """Parse a COCO annotation JSON (structure only; see :meth:`CocoAnnotations.validate`).

    Args:
        path: JSON file with ``categories``, ``annotations`` and optionally ``images``.

    Returns:
        The parsed annotations.

    Raises:
        DataValidationError: Missing file, invalid JSON, missing keys, non-integer ids.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            f"{path}: annotation file not found. Fix: check annotation_path, or run `dvc pull`."
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(
            f"{path}: not valid JSON ({exc}). Fix: re-export the COCO annotations."
        ) from exc
    expected = ["annotations", "categories"]
    if not isinstance(content, dict) or any(not isinstance(content.get(k), list) for k in expected):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataValidationError(
            f"{path}: not a COCO annotation file; keys found: {found}; expected lists "
            f"{expected} (and optionally 'images'). Fix: export COCO JSON."
        )
    categories: dict[int, str] = {}
    for pos, cat in enumerate(content["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataValidationError(
                f"{path}: categories[{pos}] has no field 'id'. Fix: give every category an id."
            )
        cid = _as_int(cat["id"], path, f"categories[{pos}]", "id")
        categories[cid] = str(cat.get("name", cid))
    shapes: dict[int, tuple[int, int]] = {}
    for pos, img in enumerate(content.get("images") or []):
        if isinstance(img, dict) and "id" in img and "height" in img and "width" in img:
            where = f"images[{pos}]"
            shapes[_as_int(img["id"], path, where, "id")] = (
                _as_int(img["height"], path, where, "height"),
                _as_int(img["width"], path, where, "width"),
            )
    annotations: list[dict[str, Any]] = []
    for pos, ann in enumerate(content["annotations"]):
        if not isinstance(ann, dict):
            raise DataValidationError(
                f"{path}: annotations[{pos}] is not an object. Fix: export COCO JSON."
            )
        where = f"annotation id {ann.get('id', pos)} (annotations[{pos}])"
        for key in ("image_id", "category_id"):
            if key not in ann:
                raise DataValidationError(
                    f"{path}: {where}: missing field {key!r}; keys found: {sorted(ann)}. Fix: "
                    f"give every annotation image_id (frame index) and category_id."
                )
            ann[key] = _as_int(ann[key], path, where, key)
        if "id" in ann:
            ann["id"] = _as_int(ann["id"], path, where, "id")
        _check_geometry(ann, path, where)
        annotations.append(ann)
    return CocoAnnotations(
        path=path, categories=categories, image_shapes=shapes, annotations=annotations
    )


def anomaly_mask(class_mask: np.ndarray, normal_class_ids: Iterable[int] = (0,)) -> np.ndarray:
    """Binary anomaly mask from a class mask: True where the class is not a normal one.

    Args:
        class_mask: (H, W) class ids.
        normal_class_ids: Classes counted as normal (background 0 by default).

    Returns:
        bool (H, W).
    """
    return ~np.isin(class_mask, np.asarray(list(normal_class_ids), dtype=np.int64))
