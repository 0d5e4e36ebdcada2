"""Bad files of every format cubeline reads: one error line naming the file, nothing stored."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.faults.helpers import assert_clean_failure, tree

H, W, C = 6, 6, 205  # params.yaml expects 205 bands


def _frame(path: Path, *, mask: bool = True, **override: object) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, object] = {"cube": rng.normal(100, 5, (H, W, C)).astype(np.float32)}
    if mask:
        m = np.zeros((H, W), bool)
        m[1, 1] = True
        arrays["mask"] = m
    arrays.update(override)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _savez(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _absurd_header(path: Path) -> Path:
    """An .npz whose ``cube`` header declares ~10^15 elements (the data is 16 bytes)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000, 205), }"
    header = header.ljust(118) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 16
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("cube.npy", npy)
        buf = io.BytesIO()
        np.save(buf, np.zeros((H, W), bool))
        z.writestr("mask.npy", buf.getvalue())
    return path


FRAME_CASES: dict[str, Callable[[Path], Path]] = {
    "npz_empty": lambda p: (p.write_bytes(b""), p)[1],
    "npz_garbage": lambda p: (p.write_bytes(b"PK\x03\x04 not really a zip"), p)[1],
    "npz_absurd_header": _absurd_header,
    "npz_object_array": lambda p: _savez(p, cube=np.array([{"a": 1}], dtype=object),
                                         mask=np.zeros((H, W), bool)),
    "npz_no_cube": lambda p: _savez(p, mask=np.zeros((H, W), bool)),
    "npz_nan_cube": lambda p: _frame(p, cube=np.full((H, W, C), np.nan, np.float32)),
    "npz_wrong_bands": lambda p: _frame(p, cube=np.ones((H, W, 7), np.float32)),
    "npz_1d_cube": lambda p: _frame(p, cube=np.ones(C, np.float32)),
    "npz_mask_shape": lambda p: _savez(p, cube=np.ones((H, W, C), np.float32),
                                       mask=np.zeros((2, 2), bool)),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
def test_bad_frame_files(repo: Path, cli: Callable[..., tuple[int, str]], tmp_path: Path,
                         case: str) -> None:
    good = _frame(tmp_path / "good.npz")
    bad = FRAME_CASES[case](tmp_path / f"{case}.npz")
    before = tree(repo)
    other = _frame(tmp_path / "other.npz")
    rc, err = cli(repo, "ingest", str(good), str(bad), str(other))
    assert_clean_failure(rc, err, "ingest", 3, bad.name)
    assert ".ingest-" not in err, "the error must name the user's file, not the staged copy"
    assert tree(repo) == before


@pytest.mark.parametrize(
    "content", [b"", b"not a MATLAB file", b"MATLAB 5.0 MAT-file" + b"\0" * 200],
    ids=["empty", "text", "truncated_header"],
)
def test_bad_mat_files(repo: Path, cli: Callable[..., tuple[int, str]], tmp_path: Path,
                       content: bytes) -> None:
    bad = tmp_path / "frame.mat"
    bad.write_bytes(content)
    rc, err = cli(repo, "ingest", str(bad), str(_frame(tmp_path / "g.npz")),
                  str(_frame(tmp_path / "h.npz")))
    assert_clean_failure(rc, err, "ingest", 3, "frame.mat")


def _coco(ann: dict[str, object]) -> dict[str, object]:
    return {
        "images": [{"id": i, "width": W, "height": H, "file_name": f"f{i}"} for i in range(3)],
        "annotations": [
            *({"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 2, 2]}
              for i in range(3)),
            {"id": 1, "image_id": 0, "category_id": 1, **ann},
        ],
        "categories": [{"id": 1, "name": "anomaly"}],
    }


COCO_CASES: dict[str, str] = {
    "nan_polygon": json.dumps(_coco({"segmentation": [[0, 0, float("nan"), 1, 2, 2]]})),
    "inf_bbox": json.dumps(_coco({"bbox": [0, 0, float("inf"), 2]})),
    "string_coords": json.dumps(_coco({"segmentation": [["a", "b", "c", "d", "e", "f"]]})),
    "huge_image_id": json.dumps(_coco({"image_id": 10**30, "bbox": [0, 0, 1, 1]})),
    "huge_coords": json.dumps(_coco({"bbox": [0, 0, 1e300, 1e300]})),
    "bool_coords": json.dumps(_coco({"bbox": [True, 0, 1, 1]})),
    "bad_rle": json.dumps(_coco({"segmentation": {"counts": 5, "size": "x"}})),
    "not_json": "{ this is not json",
    "not_a_mapping": "[1, 2, 3]",
    "no_annotations": json.dumps({"images": []}),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_bad_coco_annotations(repo: Path, cli: Callable[..., tuple[int, str]], tmp_path: Path,
                              case: str) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(COCO_CASES[case])
    frames = [str(_frame(tmp_path / f"f{i}.npz", mask=False)) for i in range(3)]
    before = tree(repo)
    rc, err = cli(repo, "ingest", *frames, "--labels", str(labels))
    assert_clean_failure(rc, err, "ingest", 3, "labels.json")
    assert ".ingest-" not in err, "the error must name the user's file, not the staged copy"
    assert tree(repo) == before


def test_missing_input_file(repo: Path, cli: Callable[..., tuple[int, str]], tmp_path: Path
                            ) -> None:
    rc, err = cli(repo, "ingest", str(tmp_path / "absent.npz"), str(_frame(tmp_path / "g.npz")),
                  str(_frame(tmp_path / "h.npz")))
    assert_clean_failure(rc, err, "ingest", 3, "absent.npz")


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\0" + b"\xff" * 100, b"garbage" * 500],
                         ids=["empty_file", "truncated", "garbage"])
def test_corrupt_mlflow_store(repo: Path, cli: Callable[..., tuple[int, str]], content: bytes
                              ) -> None:
    (repo / "mlflow.db").write_bytes(content)
    for command in ("history", "rollback"):
        rc, err = cli(repo, command)
        if content == b"" and rc in (0, 4):
            continue  # SQLite takes an empty file as a new, empty store
        assert_clean_failure(rc, err, command, 5, "mlflow")


def test_mlflow_store_is_a_directory(repo: Path, cli: Callable[..., tuple[int, str]]) -> None:
    (repo / "mlflow.db").mkdir()
    rc, err = cli(repo, "history")
    assert rc in (5, 9)
    assert_clean_failure(rc, err, "history", rc, "mlflow")
