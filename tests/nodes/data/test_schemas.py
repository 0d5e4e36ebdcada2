"""Tests of nodes/data/schemas.py: each frame/annotation check fails with file, field and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from nodes.data.readers import Frame
from nodes.data.schemas import frame_table, validate_annotations, validate_frames
from nodes.errors import DataValidationError


def _row(**changes: Any) -> dict[str, Any]:
    frame = Frame(
        cube=np.ones((4, 5, 3), np.float32),
        mask=np.zeros((4, 5), bool),
        wavelengths=np.array([400, 500, 600], np.float32),
        class_mask=np.zeros((4, 5), np.int64),
        source=Path("scene.npz"),
    )
    row = frame.summary()
    row.update(changes)
    return row


def test_good_rows_pass_and_come_back_as_table() -> None:
    table = validate_frames([_row(), _row(frame_id=1)], expected_channels=3)
    assert isinstance(table, pd.DataFrame) and len(table) == 2
    assert table["channels"].tolist() == [3, 3]


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"n_nonfinite": 2, "first_nonfinite": "row=1, col=2, band=0"}, "n_nonfinite", "row=1"),
        ({"mask_height": 3}, "mask_height", "mask is 3 x 5"),
        ({"mask_width": 6}, "mask_width", "mask is 4 x 6"),
        ({"class_mask_height": 2, "class_mask_width": 2}, "class_mask", "class_mask is 2 x 2"),
        ({"n_wavelengths": 2}, "n_wavelengths", "has 3 bands"),
        ({"dtype_kind": "O"}, "dtype_kind", "integer or floating-point"),
        (
            {"height": 0, "mask_height": 0, "class_mask_height": 0, "class_mask_width": 0},
            "height",
            "empty",
        ),
    ],
)
def test_each_frame_check_names_file_field_and_fix(
    changes: dict[str, Any], field: str, hint: str
) -> None:
    with pytest.raises(DataValidationError) as err:
        validate_frames([_row(), _row(frame_id=1, **changes)])
    msg = str(err.value)
    assert "scene.npz (frame_id 1, index 0 in file)" in msg
    assert f"field {field!r}" in msg and hint in msg
    assert "Fix:" in msg and "pandera report" in msg
    assert "frame_id 0," not in msg  # the good frame is not blamed


def test_expected_channels_mismatch() -> None:
    with pytest.raises(DataValidationError) as err:
        validate_frames([_row()], expected_channels=205)
    msg = str(err.value)
    assert "scene.npz" in msg and "3 bands" in msg and "expected_channels is 205" in msg


def test_all_failures_are_listed() -> None:
    rows = [
        _row(n_nonfinite=1, first_nonfinite="row=0, col=0, band=0"),
        _row(frame_id=1, mask_width=1),
    ]
    with pytest.raises(DataValidationError) as err:
        validate_frames(rows)
    assert "frame_id 0" in str(err.value) and "frame_id 1" in str(err.value)


def test_duplicate_frame_ids() -> None:
    with pytest.raises(DataValidationError, match="'frame_id'"):
        validate_frames([_row(), _row()])


def test_empty_and_incomplete_tables() -> None:
    with pytest.raises(DataValidationError, match="no frames"):
        validate_frames([])
    row = _row()
    del row["n_nonfinite"]
    with pytest.raises(DataValidationError, match="lack column"):
        validate_frames([row])


def test_frame_table_types() -> None:
    table = frame_table([_row()])
    assert table["height"].dtype == np.int64 and table["labelled"].dtype == bool


def _ann(**changes: Any) -> dict[str, Any]:
    row = {
        "file": "ann.json",
        "annotation_id": 1,
        "image_id": 0,
        "category_id": 1,
        "has_segmentation": True,
        "has_bbox": False,
    }
    row.update(changes)
    return row


def test_annotations_pass_and_empty_table_is_fine() -> None:
    assert len(validate_annotations([_ann(), _ann(annotation_id=2, image_id=4)], 5, [1])) == 2
    assert len(validate_annotations([], 5, [1])) == 0


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"image_id": 5}, "valid image_id 0..4"),
        ({"image_id": -1}, "'image_id' = -1"),
        ({"category_id": 3}, "known categories: [1]"),
        ({"has_segmentation": False}, "'segmentation/bbox'"),
    ],
)
def test_annotation_checks(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(DataValidationError) as err:
        validate_annotations([_ann(**changes)], 5, [1])
    msg = str(err.value)
    assert "ann.json: annotation id 1" in msg and needle in msg and "Fix:" in msg
