"""Tests of nodes/data/coco.py: polygons, both RLE forms, category ids, error messages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nodes.data.coco import (
    anomaly_mask,
    counts_to_rle_string,
    decode_rle,
    encode_rle,
    load_coco,
    rasterize_bbox,
    rasterize_polygons,
    rle_string_to_counts,
)
from nodes.errors import DataValidationError

WriteJson = Callable[..., Path]

# ----------------------------------------------------------------------------- RLE

# Worked by hand from the COCO string format (5-bit groups + 48, 0x20 = continue, 0x10 of the
# last group = sign, runs from the 4th on stored as the difference to the run two before):
#   100 -> groups 4 (cont.), 3            -> 'T', '3'
#   200 - 3 = 197 -> groups 5 (cont.), 6  -> 'U', '6'
#   1 - 2 = -1 -> group 31 (sign set)     -> 'O'
HAND_VECTORS = [
    ([100, 3, 7, 200], "T337U6"),
    ([10, 2, 1, 1], ":21O"),
    ([6], "6"),
]


@pytest.mark.parametrize(("counts", "text"), HAND_VECTORS)
def test_rle_string_hand_vectors(counts: list[int], text: str) -> None:
    assert counts_to_rle_string(counts) == text
    assert rle_string_to_counts(text) == counts


def test_uncompressed_rle_is_column_major() -> None:
    # H=3, W=2; column-major walk: col0 = 0,0,1 then col1 = 1,1,0 -> runs 2 (bg), 3 (fg), 1 (bg)
    expected = np.array([[0, 1], [0, 1], [1, 0]], dtype=bool)
    got = decode_rle({"size": [3, 2], "counts": [2, 3, 1]})
    np.testing.assert_array_equal(got, expected)


def test_rle_of_mask_starting_with_foreground() -> None:
    mask = np.ones((2, 2), dtype=bool)
    assert encode_rle(mask, compressed=False)["counts"] == [0, 4]
    np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip_random_masks(seed: int, compressed: bool) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 60, size=2)
    # Blobs give long runs (multi-group values, negative deltas); noise gives short ones.
    mask = rng.random((h, w)) < (0.5 if seed % 2 else 0.05)
    mask[: h // 2, : w // 3] = True
    rle = encode_rle(mask, compressed=compressed)
    assert isinstance(rle["counts"], str if compressed else list)
    assert rle["size"] == [h, w]
    np.testing.assert_array_equal(decode_rle(rle), mask)
    np.testing.assert_array_equal(decode_rle(rle, int(h), int(w)), mask)


def test_long_runs_round_trip() -> None:
    counts = [0, 70000, 3, 1, 123456, 2]
    assert rle_string_to_counts(counts_to_rle_string(counts)) == counts


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"size": [2, 2], "counts": [1, 2]}, "cover 3 pixels"),
        ({"size": [2, 2], "counts": "!!"}, "not RLE alphabet"),
        ({"size": [2, 2], "counts": "T"}, "truncated run"),
        ({"size": [2, 2], "counts": 7}, "must be a string"),
        ({"counts": [4]}, "no 'size'"),
    ],
)
def test_malformed_rle(rle: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_rle(rle)


def test_rle_size_must_match_frame() -> None:
    with pytest.raises(ValueError, match="differs"):
        decode_rle({"size": [2, 3], "counts": [6]}, 3, 2)


# ----------------------------------------------------------------------------- polygons, bbox


def test_polygon_rectangle_covers_pixel_centres_inside() -> None:
    mask = rasterize_polygons([[1, 1, 4, 1, 4, 3, 1, 3]], height=5, width=6)
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True  # rows with centres 1.5, 2.5; cols 1.5..3.5
    np.testing.assert_array_equal(mask, expected)


def test_polygon_triangle_area_and_union() -> None:
    tri = [0, 0, 40, 0, 0, 40]
    mask = rasterize_polygons([tri], 50, 50)
    assert abs(int(mask.sum()) - 800) <= 40  # area 800 px, boundary pixels either way
    assert mask[0, 0] and not mask[39, 39]
    both = rasterize_polygons([tri, [45, 45, 49, 45, 49, 49, 45, 49]], 50, 50)
    assert int(both.sum()) == int(mask.sum()) + 16


def test_polygon_clipped_to_frame() -> None:
    mask = rasterize_polygons([[-5, -5, 3, -5, 3, 3, -5, 3]], 4, 4)
    assert int(mask.sum()) == 9


def test_degenerate_polygon_rejected() -> None:
    with pytest.raises(ValueError, match="need an even count >= 6"):
        rasterize_polygons([[1, 1, 2, 2]], 4, 4)


def test_bbox() -> None:
    mask = rasterize_bbox([2, 1, 3, 2], 5, 6)
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 2:5] = True
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------- files


def _coco(annotations: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "images": extra.pop("images", [{"id": i, "height": 6, "width": 5} for i in range(3)]),
        "categories": extra.pop("categories", [{"id": 1, "name": "stone"}, {"id": 2, "name": "x"}]),
        "annotations": annotations,
        **extra,
    }


def test_class_mask_from_all_geometry_kinds(write_json: WriteJson) -> None:
    blob = np.zeros((6, 5), dtype=bool)
    blob[4:6, 0:2] = True
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
        {"id": 11, "image_id": 1, "category_id": 2, "segmentation": encode_rle(blob)},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [4, 0, 1, 1]},
        {
            "id": 13,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": encode_rle(blob, compressed=False),
        },
    ]
    coco = load_coco(write_json(_coco(anns)))
    coco.validate(n_frames=3)
    assert coco.categories == {1: "stone", 2: "x"}
    assert coco.annotated_frames() == {1, 2}
    cm = coco.class_mask(1, 6, 5)
    assert cm.dtype == np.int64
    expected = np.zeros((6, 5), dtype=np.int64)
    expected[0:2, 0:2] = 1
    expected[blob] = 2
    expected[0, 4] = 2
    np.testing.assert_array_equal(cm, expected)
    np.testing.assert_array_equal(coco.class_mask(2, 6, 5), blob.astype(np.int64))
    assert not coco.class_mask(0, 6, 5).any()  # frame without annotations: all background
    np.testing.assert_array_equal(anomaly_mask(cm, [0]), cm != 0)
    np.testing.assert_array_equal(anomaly_mask(cm, [0, 1]), cm == 2)


def test_later_annotation_wins_on_overlap(write_json: WriteJson) -> None:
    square = [[0, 0, 3, 0, 3, 3, 0, 3]]
    anns = [
        {"id": 1, "image_id": 0, "category_id": 1, "segmentation": square},
        {"id": 2, "image_id": 0, "category_id": 2, "segmentation": square},
    ]
    cm = load_coco(write_json(_coco(anns))).class_mask(0, 6, 5)
    assert set(np.unique(cm[:3, :3])) == {2}


def test_image_id_out_of_range_names_file_and_id(write_json: WriteJson) -> None:
    path = write_json(_coco([{"id": 7, "image_id": 12, "category_id": 1, "bbox": [0, 0, 1, 1]}]))
    coco = load_coco(path)
    with pytest.raises(DataValidationError) as err:
        coco.validate(n_frames=5)
    msg = str(err.value)
    assert str(path) in msg and "annotation id 7" in msg
    assert "'image_id' = 12" in msg and "valid image_id 0..4" in msg and "Fix:" in msg


def test_unknown_category_and_missing_geometry(write_json: WriteJson) -> None:
    anns: list[dict[str, Any]] = [
        {"id": 1, "image_id": 0, "category_id": 9, "bbox": [0, 0, 1, 1]},
        {"id": 2, "image_id": 0, "category_id": 1},
    ]
    with pytest.raises(DataValidationError) as err:
        load_coco(write_json(_coco(anns))).validate(3)
    msg = str(err.value)
    assert (
        "annotation id 1" in msg
        and "'category_id' = 9" in msg
        and "known categories: [1, 2]" in msg
    )
    assert "annotation id 2" in msg and "segmentation/bbox" in msg


def test_image_shape_mismatch(write_json: WriteJson) -> None:
    path = write_json(_coco([]))
    with pytest.raises(DataValidationError, match="declared 6 x 5 in 'images'"):
        load_coco(path).class_mask(0, 7, 5)


def test_malformed_segmentation_names_annotation(write_json: WriteJson) -> None:
    anns = [
        {"id": 4, "image_id": 0, "category_id": 1, "segmentation": {"size": [6, 5], "counts": [3]}}
    ]
    path = write_json(_coco(anns))
    with pytest.raises(DataValidationError) as err:
        load_coco(path).class_mask(0, 6, 5)
    assert str(path) in str(err.value) and "annotation id 4" in str(err.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"images": []}', "expected lists \\['annotations', 'categories'\\]"),
        ("[1, 2]", "keys found: list"),
        ('{"annotations": [{"id": 1, "category_id": 1}], "categories": []}', "'image_id'"),
        ('{"annotations": [{"image_id": 0.5, "category_id": 1}], "categories": []}', "integer"),
        ('{"annotations": [], "categories": [{"name": "a"}]}', "no field 'id'"),
    ],
)
def test_bad_json_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(DataValidationError, match=match) as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="annotation file not found"):
        load_coco(tmp_path / "none.json")
