"""pandera schemas for the data layer: per-frame summaries and COCO annotation rows.

pandera's pandas backend validates tables, not ndarrays, so each frame is reduced to one summary
row (shape, dtype kind, count of non-finite values, mask shape...) by
:meth:`nodes.data.readers.Frame.summary`, and each COCO annotation to one row. The schemas are
the single place where frame *content* is judged, whatever the input path (files or in-memory
arrays). A failure becomes a :class:`~nodes.errors.DataValidationError` that names the file, the
field and the fix for every failing row, followed by pandera's own report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import pandera.pandas as pa
from pandera.typing.pandas import Series

from nodes.errors import DataValidationError

_PANDERA_TEXT_LIMIT = 4000


class FrameSummarySchema(pa.DataFrameModel):
    """One row per frame, as produced by ``Frame.summary``."""

    file: Series[str]
    frame_id: Series[int] = pa.Field(ge=0, unique=True)
    index_in_file: Series[int] = pa.Field(ge=0)
    height: Series[int] = pa.Field(gt=0)
    width: Series[int] = pa.Field(gt=0)
    channels: Series[int] = pa.Field(gt=0)
    dtype_kind: Series[str] = pa.Field(isin=["u", "i", "f", "b"])
    n_nonfinite: Series[int] = pa.Field(eq=0)
    first_nonfinite: Series[str]
    mask_height: Series[int]
    mask_width: Series[int]
    class_mask_height: Series[int] = pa.Field(ge=0)
    class_mask_width: Series[int] = pa.Field(ge=0)
    n_wavelengths: Series[int] = pa.Field(ge=0)
    n_anomaly: Series[int] = pa.Field(ge=0)
    labelled: Series[bool]

    @pa.dataframe_check
    @classmethod
    def mask_height_matches(cls, df: pd.DataFrame) -> Series[bool]:
        """The mask has as many rows as the cube."""
        return df["mask_height"] == df["height"]

    @pa.dataframe_check
    @classmethod
    def mask_width_matches(cls, df: pd.DataFrame) -> Series[bool]:
        """The mask has as many columns as the cube."""
        return df["mask_width"] == df["width"]

    @pa.dataframe_check
    @classmethod
    def class_mask_shape_matches(cls, df: pd.DataFrame) -> Series[bool]:
        """A class mask, where present (non-zero shape), is H x W like the cube."""
        absent = (df["class_mask_height"] == 0) & (df["class_mask_width"] == 0)
        same = (df["class_mask_height"] == df["height"]) & (df["class_mask_width"] == df["width"])
        return absent | same

    @pa.dataframe_check
    @classmethod
    def wavelengths_match_channels(cls, df: pd.DataFrame) -> Series[bool]:
        """Wavelengths, where present, give one value per band."""
        return (df["n_wavelengths"] == 0) | (df["n_wavelengths"] == df["channels"])

    class Config:
        """Reject unexpected columns: the table is built by code, a stray column is a bug."""

        strict = True


class AnnotationSchema(pa.DataFrameModel):
    """One row per COCO annotation (range and category checks are added per session)."""

    file: Series[str]
    annotation_id: Series[int]
    image_id: Series[int] = pa.Field(ge=0)
    category_id: Series[int]
    has_segmentation: Series[bool]
    has_bbox: Series[bool]

    @pa.dataframe_check
    @classmethod
    def geometry_present(cls, df: pd.DataFrame) -> Series[bool]:
        """Every annotation has a segmentation (polygon/RLE) or at least a bbox."""
        return df["has_segmentation"] | df["has_bbox"]

    class Config:
        """Reject unexpected columns."""

        strict = True


FRAME_COLUMNS: dict[str, Any] = {
    "file": str,
    "frame_id": "int64",
    "index_in_file": "int64",
    "height": "int64",
    "width": "int64",
    "channels": "int64",
    "dtype_kind": str,
    "n_nonfinite": "int64",
    "first_nonfinite": str,
    "mask_height": "int64",
    "mask_width": "int64",
    "class_mask_height": "int64",
    "class_mask_width": "int64",
    "n_wavelengths": "int64",
    "n_anomaly": "int64",
    "labelled": bool,
}

ANNOTATION_COLUMNS: dict[str, Any] = {
    "file": str,
    "annotation_id": "int64",
    "image_id": "int64",
    "category_id": "int64",
    "has_segmentation": bool,
    "has_bbox": bool,
}

# Which summary field a failing check is about, and what the user should do about it.
_FIELD_OF_CHECK: dict[str, str] = {
    "mask_height_matches": "mask_height",
    "mask_width_matches": "mask_width",
    "class_mask_shape_matches": "class_mask",
    "wavelengths_match_channels": "n_wavelengths",
    "geometry_present": "segmentation/bbox",
}

_FRAME_FIXES: dict[str, str] = {
    "n_nonfinite": (
        "replace or mask the NaN/Inf pixels at the source (re-export the frame, or interpolate "
        "them from neighbours); non-finite values poison the float64 statistics of Phase 1"
    ),
    "mask_height": "store the mask with the cube's height and width (H x W, 1 = anomaly)",
    "mask_width": "store the mask with the cube's height and width (H x W, 1 = anomaly)",
    "class_mask": "store class_mask with the cube's height and width (H x W)",
    "n_wavelengths": "store one wavelength per band (shape (C,)) or none at all",
    "channels": (
        "use files with the expected number of bands, or change expected_channels (the "
        "pipeline's input_channels) to match the data"
    ),
    "height": "the cube is empty: re-export the frame",
    "width": "the cube is empty: re-export the frame",
    "dtype_kind": "store the cube as an integer or floating-point array",
    "frame_id": "frame ids must be unique: list each frame once",
}

_ANNOTATION_FIXES: dict[str, str] = {
    "image_id": (
        "image_id is the frame index within the session: correct it, or drop the annotation"
    ),
    "category_id": "add the category to the JSON's 'categories' list, or correct category_id",
    "segmentation/bbox": "give the annotation a 'segmentation' (polygon or RLE) or a 'bbox'",
    "annotation_id": "annotation ids must be integers",
}


def _typed_table(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, Any]) -> pd.DataFrame:
    rows = list(rows)
    missing = sorted({c for r in rows for c in columns if c not in r})
    if missing:
        raise DataValidationError(
            f"summary rows lack column(s) {missing}; expected {list(columns)}. Fix: build rows "
            "with Frame.summary() / the COCO loader, not by hand."
        )
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=dt) for c, dt in columns.items()})


def frame_table(summaries: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Build the typed per-frame summary table from ``Frame.summary()`` rows.

    Args:
        summaries: Rows (dicts) or an existing table.

    Returns:
        A DataFrame with the columns of :class:`FrameSummarySchema`.
    """
    if isinstance(summaries, pd.DataFrame):
        return summaries.reset_index(drop=True)
    return _typed_table(summaries, FRAME_COLUMNS)


def annotation_table(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Build the typed annotation table (columns of :class:`AnnotationSchema`).

    Args:
        rows: Rows (dicts) or an existing table.

    Returns:
        The table.
    """
    if isinstance(rows, pd.DataFrame):
        return rows.reset_index(drop=True)
    return _typed_table(rows, ANNOTATION_COLUMNS)


def _with_extra_checks(
    schema: pa.DataFrameSchema, extra: Mapping[str, Sequence[pa.Check]]
) -> pa.DataFrameSchema:
    for column, checks in extra.items():
        schema = schema.update_column(column, checks=[*schema.columns[column].checks, *checks])
    return schema


def _readable_error(
    err: pa.errors.SchemaErrors,
    table: pd.DataFrame,
    header: str,
    describe_row: Callable[[pd.Series], str],
    fixes: Mapping[str, str],
    extra_info: Callable[[str, pd.Series], str] | None = None,
) -> DataValidationError:
    lines: list[str] = []
    seen: set[tuple[str, str, object]] = set()
    cases = err.failure_cases
    for _, case in cases.iterrows():
        check = str(case["check"])
        column = case["column"]
        field = _FIELD_OF_CHECK.get(check, str(column) if column is not None else check)
        index = case["index"]
        key = (field, check, index)
        if key in seen:
            continue
        seen.add(key)
        fix = fixes.get(field, "correct the input so it meets the check")
        if index is None or pd.isna(index) or int(index) not in table.index:
            lines.append(
                f"  - table: field {field!r} fails {check} ({case['failure_case']}). Fix: {fix}."
            )
            continue
        row = table.loc[int(index)]
        value = f" = {row[field]}" if field in row.index else ""
        extra = extra_info(field, row) if extra_info is not None else ""
        lines.append(
            f"  - {describe_row(row)}: field {field!r}{value} fails {check}{extra}. Fix: {fix}."
        )
    text = str(err)
    if len(text) > _PANDERA_TEXT_LIMIT:
        text = text[:_PANDERA_TEXT_LIMIT] + "\n... (pandera report truncated)"
    return DataValidationError(header + "\n" + "\n".join(lines) + "\npandera report:\n" + text)


def _describe_frame(row: pd.Series) -> str:
    return f"{row['file']} (frame_id {row['frame_id']}, index {row['index_in_file']} in file)"


def _frame_extra(field: str, row: pd.Series, expected_channels: int | None) -> str:
    if field == "channels" and expected_channels is not None:
        return f" (the file has {row['channels']} bands, expected_channels is {expected_channels})"
    if field == "n_nonfinite" and row["first_nonfinite"]:
        return f" (first non-finite value at {row['first_nonfinite']})"
    if field in ("mask_height", "mask_width"):
        return (
            f" (cube is {row['height']} x {row['width']}, mask is "
            f"{row['mask_height']} x {row['mask_width']})"
        )
    if field == "class_mask":
        return (
            f" (cube is {row['height']} x {row['width']}, class_mask is "
            f"{row['class_mask_height']} x {row['class_mask_width']})"
        )
    if field == "n_wavelengths":
        return f" (the cube has {row['channels']} bands)"
    return ""


def validate_frames(
    summaries: Iterable[Mapping[str, Any]] | pd.DataFrame,
    expected_channels: int | None = None,
) -> pd.DataFrame:
    """Validate per-frame summaries against :class:`FrameSummarySchema`.

    Args:
        summaries: ``Frame.summary()`` rows, or a table of them.
        expected_channels: If given, every frame must have exactly this many bands.

    Returns:
        The validated summary table.

    Raises:
        DataValidationError: Listing, for every failing frame, its file, the field, the value
            and the fix, followed by pandera's report.
    """
    table = frame_table(summaries)
    if table.empty:
        raise DataValidationError(
            "no frames to validate. Fix: give at least one file/array and non-empty splits."
        )
    schema = FrameSummarySchema.to_schema()
    if expected_channels is not None:
        schema = _with_extra_checks(
            schema, {"channels": [pa.Check.equal_to(int(expected_channels))]}
        )
    try:
        return schema.validate(table, lazy=True)
    except pa.errors.SchemaErrors as err:
        expected = (
            f" (expected_channels = {expected_channels})" if expected_channels is not None else ""
        )
        raise _readable_error(
            err,
            table,
            f"frame validation failed{expected}:",
            _describe_frame,
            _FRAME_FIXES,
            lambda field, row: _frame_extra(field, row, expected_channels),
        ) from None


def validate_annotations(
    rows: Iterable[Mapping[str, Any]] | pd.DataFrame,
    n_frames: int,
    category_ids: Iterable[int],
) -> pd.DataFrame:
    """Validate COCO annotation rows: image_id in ``0..n_frames-1``, known category, geometry.

    Args:
        rows: One dict per annotation (see ``ANNOTATION_COLUMNS``), or a table.
        n_frames: Frames in the session; ``image_id`` indexes them.
        category_ids: Ids declared in the JSON's ``categories``.

    Returns:
        The validated table (possibly empty).

    Raises:
        DataValidationError: Naming the JSON file, the annotation id, the field and the fix.
    """
    table = annotation_table(rows)
    known = sorted({int(c) for c in category_ids})
    schema = _with_extra_checks(
        AnnotationSchema.to_schema(),
        {
            "image_id": [pa.Check.in_range(0, max(n_frames - 1, 0))]
            if n_frames > 0
            else [pa.Check.lt(0)],
            "category_id": [pa.Check.isin(known)],
        },
    )
    try:
        return schema.validate(table, lazy=True)
    except pa.errors.SchemaErrors as err:
        valid = f"0..{n_frames - 1}" if n_frames > 0 else "none"

        def extra(field: str, row: pd.Series) -> str:
            if field == "image_id":
                return f" (the session has {n_frames} frame(s): valid image_id {valid})"
            if field == "category_id":
                return f" (known categories: {known})"
            return ""

        raise _readable_error(
            err,
            table,
            "annotation validation failed:",
            lambda row: (
                f"{row['file']}: annotation id {row['annotation_id']} (image_id {row['image_id']})"
            ),
            _ANNOTATION_FIXES,
            extra,
        ) from None
