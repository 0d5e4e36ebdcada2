"""Tests of nodes/data/readers.py: real ABU scenes, generated .npz, every bad-input path."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io

from nodes.data.readers import (
    Frame,
    count_frames,
    iter_frames,
    iter_frames_at,
    read_frame,
    read_frames,
    write_session_npz,
)
from nodes.errors import DataValidationError

# From shared/data/README.md: bands, anomaly pixels and stored dtype per scene.
SCENE_FACTS = {
    "airport-1": (205, 144, "uint16"),
    "airport-2": (205, 87, "uint16"),
    "airport-3": (205, 170, "int16"),
    "urban-4": (205, 272, "int16"),
    "urban-5": (205, 232, "int16"),
    "urban-1": (204, 67, "int16"),
    "urban-2": (207, 155, "int16"),
    "beach-3": (188, 11, "int16"),
}

ScenePath = Callable[[str], Path]

# ----------------------------------------------------------------------------- real scenes


@pytest.mark.parametrize("name", sorted(SCENE_FACTS))
def test_real_scene_matches_published_facts(name: str, scene_path: ScenePath) -> None:
    bands, anomalies, dtype = SCENE_FACTS[name]
    (frame,) = read_frames(scene_path(name))
    assert frame.cube.shape == (100, 100, bands)
    assert frame.cube.dtype == np.float32
    assert frame.mask.dtype == bool and frame.mask.shape == (100, 100)
    assert int(frame.mask.sum()) == anomalies
    assert frame.raw_dtype == dtype
    assert frame.wavelengths is None  # ABU stores none: bands are selected by index
    assert frame.class_mask is not None and set(np.unique(frame.class_mask)) == {0, 1}
    assert frame.index == 0 and frame.labelled


def test_mat_values_are_the_file_values(scene_path: ScenePath) -> None:
    path = scene_path("airport-1")
    raw = scipy.io.loadmat(str(path))
    (frame,) = read_frames(path)
    np.testing.assert_array_equal(frame.cube, raw["data"].astype(np.float32))
    np.testing.assert_array_equal(frame.mask, raw["map"] == 1)


def test_count_frames_of_single_frame_files(
    scene_path: ScenePath, make_npz: Callable[..., Path]
) -> None:
    assert count_frames(scene_path("urban-4")) == 1
    assert count_frames(make_npz()) == 1


# ----------------------------------------------------------------------------- .npz export


def test_npz_round_trip(make_npz: Callable[..., Path], make_cube: Callable[..., Any]) -> None:
    path = make_npz(seed=3)
    cube, mask = make_cube(seed=3)
    (frame,) = read_frames(path, expected_channels=6)
    np.testing.assert_array_equal(frame.cube, cube)
    np.testing.assert_array_equal(frame.mask, mask)
    assert frame.wavelengths is not None and frame.wavelengths.dtype == np.float32
    np.testing.assert_array_equal(frame.wavelengths, np.arange(450, 510, 10))
    assert frame.class_mask is not None and frame.class_mask.dtype == np.int64
    assert set(np.unique(frame.class_mask)) == {0, 3}
    assert frame.source == path and frame.raw_dtype == "float32"


def test_npz_mask_from_class_mask(make_npz: Callable[..., Path]) -> None:
    (frame,) = read_frames(make_npz(mask=None))
    assert frame.class_mask is not None
    np.testing.assert_array_equal(frame.mask, frame.class_mask != 0)


def test_npz_without_labels_only_when_allowed(make_npz: Callable[..., Path]) -> None:
    path = make_npz(mask=None, class_mask=None)
    with pytest.raises(DataValidationError, match="missing field"):
        read_frames(path)
    frame = read_frame(path, require_labels=False)
    assert not frame.labelled and not frame.mask.any()


def test_iter_frames_yields_in_order(make_npz: Callable[..., Path]) -> None:
    frames = list(iter_frames(make_npz()))
    assert len(frames) == 1 and isinstance(frames[0], Frame)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("suffix", [".mat", ".npz", ".cu3s"])
def test_missing_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"nope{suffix}"
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    assert str(path) in str(err.value) and "not found" in str(err.value)
    assert "dvc pull" in str(err.value)
    with pytest.raises(DataValidationError, match="not found"):
        count_frames(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scene.tif"
    path.write_bytes(b"II*\x00")
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    msg = str(err.value)
    assert str(path) in msg and "'.tif'" in msg and ".mat" in msg and ".cu3s" in msg


def test_truncated_mat(tmp_path: Path, scene_path: ScenePath) -> None:
    path = tmp_path / "cut.mat"
    path.write_bytes(scene_path("airport-1").read_bytes()[:100_000])
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)


def test_garbage_mat(tmp_path: Path) -> None:
    path = tmp_path / "noise.mat"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataValidationError, match="truncated or corrupt"):
        read_frames(path)


def test_mat_wrong_keys_lists_found_and_expected(tmp_path: Path) -> None:
    path = tmp_path / "renamed.mat"
    scipy.io.savemat(str(path), {"cube": np.zeros((4, 4, 3)), "labels": np.zeros((4, 4))})
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "['cube', 'labels']" in msg  # keys found
    assert "['data', 'map']" in msg  # keys expected


def test_mat_wrong_rank(tmp_path: Path) -> None:
    path = tmp_path / "flat.mat"
    scipy.io.savemat(str(path), {"data": np.zeros((4, 12)), "map": np.zeros((4, 4))})
    with pytest.raises(DataValidationError, match=r"field 'data' has shape \(4, 12\)"):
        read_frames(path)


def test_truncated_npz(tmp_path: Path, make_npz: Callable[..., Path]) -> None:
    good = make_npz()
    path = tmp_path / "cut.npz"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)


def test_npz_corrupt_member(tmp_path: Path, make_npz: Callable[..., Path]) -> None:
    # Flip bytes inside the stored cube: the zip directory is intact, the member CRC is not.
    data = bytearray(make_npz().read_bytes())
    start = data.find(b"cube.npy") + 400
    data[start : start + 64] = bytes(64)
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataValidationError, match="truncated or corrupt"):
        read_frames(path)


def test_npz_wrong_keys_lists_found_and_expected(make_npz: Callable[..., Path]) -> None:
    path = make_npz(cube=None, data=np.zeros((3, 3, 2), dtype=np.float32))
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    msg = str(err.value)
    assert str(path) in msg and "['cube']" in msg
    assert "keys found: ['class_mask', 'data', 'mask', 'wavelengths']" in msg
    assert "expected keys: ['cube', 'mask']" in msg


def test_npy_named_npz(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with path.open("wb") as fh:
        np.save(fh, np.zeros((3, 3, 2)))
    with pytest.raises(DataValidationError, match="single array"):
        read_frames(path)


def test_nan_and_inf_pixels_reported_with_count_and_location(
    make_npz: Callable[..., Path], make_cube: Callable[..., Any]
) -> None:
    cube, _ = make_cube()
    cube[3, 4, 5] = np.nan
    cube[7, 1, 0] = np.inf
    cube[9, 9, 2] = -np.inf
    path = make_npz(cube=cube)
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "field 'n_nonfinite' = 3" in msg
    assert "row=3, col=4, band=5" in msg  # first in C order
    assert "Fix:" in msg and "pandera report" in msg


def test_cube_mask_shape_mismatch(make_npz: Callable[..., Path]) -> None:
    path = make_npz(mask=np.zeros((12, 9), dtype=np.int64), class_mask=None)
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    msg = str(err.value)
    assert str(path) in msg and "'mask_width' = 9" in msg
    assert "cube is 12 x 10, mask is 12 x 9" in msg


def test_class_mask_shape_mismatch(make_npz: Callable[..., Path]) -> None:
    path = make_npz(class_mask=np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(DataValidationError, match="class_mask is 5 x 5"):
        read_frames(path)


def test_wavelength_count_mismatch(make_npz: Callable[..., Path]) -> None:
    path = make_npz(wavelengths=np.arange(5))
    with pytest.raises(DataValidationError, match="'n_wavelengths' = 5"):
        read_frames(path)


def test_expected_channels_names_file_and_both_counts(scene_path: ScenePath) -> None:
    path = scene_path("urban-1")
    with pytest.raises(DataValidationError) as err:
        read_frames(path, expected_channels=205)
    msg = str(err.value)
    assert str(path) in msg and "204 bands" in msg and "expected_channels is 205" in msg


def test_float_mask_with_other_values(make_npz: Callable[..., Path]) -> None:
    mask = np.zeros((12, 10))
    mask[0, 0] = 0.5
    with pytest.raises(DataValidationError, match="values other than 0 and 1"):
        read_frames(make_npz(mask=mask))


def test_validation_can_be_skipped(
    make_npz: Callable[..., Path], make_cube: Callable[..., Any]
) -> None:
    cube, _ = make_cube()
    cube[0, 0, 0] = np.nan
    (frame,) = read_frames(make_npz(cube=cube), validate=False)
    assert frame.summary()["n_nonfinite"] == 1


def test_index_out_of_range_for_single_frame_file(make_npz: Callable[..., Path]) -> None:
    with pytest.raises(DataValidationError, match="valid 0"):
        read_frame(make_npz(), 1)


def test_frame_rank_checked(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="field 'mask'"):
        Frame(
            cube=np.zeros((2, 2, 2), np.float32),
            mask=np.zeros((2, 2, 1), bool),
            wavelengths=None,
            class_mask=None,
            source=tmp_path,
        )


# ----------------------------------------------------------------------------- .cu3s


class _FakeImageData:
    def __init__(self, array: np.ndarray, wavelength: list[int] | None) -> None:
        self.array = array
        self.wavelength = wavelength


class _FakeMeasurement:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data


def _fake_cuvis(cubes: list[np.ndarray | None], with_cube: bool = True) -> types.ModuleType:
    """A stand-in for Cubert's ``cuvis`` package, shaped like its documented Python API."""
    module = types.ModuleType("cuvis")
    opened: list[str] = []

    class SessionFile:
        def __init__(self, base: str) -> None:
            if not Path(base).exists():
                raise RuntimeError("Could not open SessionFile File! File not found!")
            opened.append(base)

        def __len__(self) -> int:
            return len(cubes)

        def get_measurement(self, frame_no: int) -> _FakeMeasurement | None:
            cube = cubes[frame_no]
            if cube is None:
                return None  # cuvis returns None for status_no_measurement (a gap)
            wl = [450 + 4 * i for i in range(cube.shape[2])]
            data: dict[str, Any] = {"pan": _FakeImageData(cube[..., 0], None)}
            if with_cube:
                data["cube"] = _FakeImageData(cube, wl)
            return _FakeMeasurement(data)

    module.SessionFile = SessionFile  # type: ignore[attr-defined]
    module.opened = opened  # type: ignore[attr-defined]
    return module


def _session_cubes(n: int = 3) -> list[np.ndarray | None]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 4000, size=(8, 9, 5), dtype=np.uint16) for _ in range(n)]


def test_cu3s_reader_with_standin_cuvis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cubert's SDK (libcuvis) is not installable here: this runs the .cu3s adapter against a
    stand-in module injected as ``sys.modules["cuvis"]`` that mimics the documented API
    (SessionFile, len, get_measurement, data["cube"].array / .wavelength). It proves the
    adapter's wiring, not compatibility with a real session file."""
    cubes = _session_cubes()
    fake = _fake_cuvis(cubes)
    monkeypatch.setitem(sys.modules, "cuvis", fake)
    path = tmp_path / "session.cu3s"
    path.write_bytes(b"stand-in")
    assert count_frames(path) == 3
    frames = read_frames(path)
    assert [f.index for f in frames] == [0, 1, 2]
    for f, raw in zip(frames, cubes, strict=True):
        assert raw is not None
        assert f.cube.dtype == np.float32 and f.cube.shape == (8, 9, 5)
        np.testing.assert_array_equal(f.cube, raw.astype(np.float32))
        assert f.wavelengths is not None
        np.testing.assert_array_equal(f.wavelengths, [450, 454, 458, 462, 466])
        assert f.raw_dtype == "uint16" and not f.labelled and not f.mask.any()
    second = read_frame(path, 1)
    np.testing.assert_array_equal(second.cube, frames[1].cube)
    with pytest.raises(DataValidationError, match=r"valid 0\.\.2"):
        read_frame(path, 3)


def test_cu3s_gap_and_missing_cube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in ``cuvis`` (see above): a gap and a measurement without a processed cube."""
    path = tmp_path / "gappy.cu3s"
    path.write_bytes(b"stand-in")
    monkeypatch.setitem(sys.modules, "cuvis", _fake_cuvis([*_session_cubes(1), None]))
    with pytest.raises(DataValidationError, match="measurement 1 is missing"):
        read_frames(path)
    monkeypatch.setitem(sys.modules, "cuvis", _fake_cuvis(_session_cubes(1), with_cube=False))
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    assert "no field 'cube'" in str(err.value) and "['pan']" in str(err.value)


def test_cu3s_without_sdk_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "session.cu3s"
    path.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "cuvis", None)  # makes `import cuvis` raise ImportError
    with pytest.raises(DataValidationError) as err:
        read_frames(path)
    msg = str(err.value)
    assert str(path) in msg and "pip install cuvis" in msg and ".npz" in msg
    assert "native SDK" in msg


def test_cu3s_frames_at_open_the_session_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in ``cuvis`` (see above): the data module's setup reads many frames per handle."""
    fake = _fake_cuvis(_session_cubes(4))
    monkeypatch.setitem(sys.modules, "cuvis", fake)
    path = tmp_path / "session.cu3s"
    path.write_bytes(b"stand-in")
    frames = list(iter_frames_at(path, [3, 0, 2]))
    assert [f.index for f in frames] == [3, 0, 2]
    assert fake.opened == [str(path)]
    with pytest.raises(DataValidationError, match=r"index 4 out of range"):
        list(iter_frames_at(path, [4]))


# ----------------------------------------------------------------------------- multi-frame .npz


def _frames(make_cube: Callable[..., Any], n: int = 3) -> list[Frame]:
    out = []
    for i in range(n):
        cube, mask = make_cube(seed=10 + i)
        out.append(Frame(cube=cube, mask=mask, wavelengths=None,
                         class_mask=mask.astype(np.int64) * (i + 1), source=Path(f"f{i}.mat")))
    return out


def test_multi_frame_npz_round_trip(tmp_path: Path, make_cube: Callable[..., Any]) -> None:
    frames = _frames(make_cube)
    path = write_session_npz(frames, tmp_path / "session.npz")
    assert count_frames(path) == 3
    read = list(iter_frames(path))
    assert [f.index for f in read] == [0, 1, 2]
    for want, got in zip(frames, read, strict=True):
        np.testing.assert_array_equal(got.cube, want.cube)
        np.testing.assert_array_equal(got.mask, want.mask)
        np.testing.assert_array_equal(got.class_mask, want.class_mask)
    assert read_frame(path, 2).class_mask.max() == 3  # type: ignore[union-attr]
    assert [f.index for f in iter_frames_at(path, [2, 0])] == [2, 0]
    with pytest.raises(DataValidationError, match=r"frame index 3 out of range.*valid 0\.\.2"):
        read_frame(path, 3)


def test_multi_frame_npz_rejects_mismatched_planes(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, cube=np.zeros((3, 4, 4, 2), np.float32), mask=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataValidationError, match=r"mask \(2, 4, 4\).*\(N, H, W\)"):
        list(iter_frames(path))


def test_session_writer_refuses_mixed_shapes(tmp_path: Path, make_cube: Callable[..., Any]
                                             ) -> None:
    a, b = _frames(make_cube, 2)
    b.cube = b.cube[:, :, :5].copy()
    with pytest.raises(DataValidationError, match="different shapes"):
        write_session_npz([a, b], tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()
