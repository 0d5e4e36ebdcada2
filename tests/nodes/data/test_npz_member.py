"""Direct reads of stored .npz members (nodes/data/npz_member.py) through the readers."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nodes.data import npz_member
from nodes.data.readers import read_npz
from nodes.errors import DataValidationError


def _write(path: Path, compressed: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "cube": rng.normal(size=(6, 5, 4)).astype(np.float32),
        "mask": (rng.random((6, 5)) > 0.8).astype(np.int64),
        "class_mask": np.asfortranarray(rng.integers(0, 3, size=(6, 5)).astype(np.uint8)),
        "wavelengths": np.arange(4, dtype=np.int64),
    }
    save = np.savez_compressed if compressed else np.savez
    save(path, cube=arrays["cube"], mask=arrays["mask"], class_mask=arrays["class_mask"],
         wavelengths=arrays["wavelengths"])
    return arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_members_equal_numpy_load(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / "f.npz"
    arrays = _write(path, compressed)
    with np.load(path) as npz:
        for key, want in arrays.items():
            got = npz_member.read_member(path, npz, key)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    frame = read_npz(path)
    np.testing.assert_array_equal(frame.cube, arrays["cube"])


def _cube_data_offset(path: Path) -> int:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("cube.npy")
    raw = path.read_bytes()
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:
                                                         info.header_offset + 28], "little")
    return start + int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30],
                                  "little") + 128


def _flip_a_cube_byte(path: Path) -> None:
    """Write a new version of the file: one bit of the cube flipped, a later mtime."""
    raw = bytearray(path.read_bytes())
    raw[_cube_data_offset(path) + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


def test_flipped_byte_is_caught_by_the_crc(tmp_path: Path) -> None:
    path = tmp_path / "flip.npz"
    _write(path)
    raw = bytearray(path.read_bytes())
    raw[_cube_data_offset(path) + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataValidationError, match=r"flip\.npz.*CRC.*Fix"):
        read_npz(path)


def test_crc_is_checked_once_per_file_version(tmp_path: Path) -> None:
    path = tmp_path / "once.npz"
    _write(path)
    read_npz(path)
    assert any(t[0] == str(path) for t in npz_member._LAYOUTS)
    read_npz(path)  # re-read: verified already, same result
    _flip_a_cube_byte(path)  # a new version (size or mtime): checked again
    with pytest.raises(DataValidationError, match="CRC"):
        read_npz(path)


def test_truncated_member_is_a_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    _write(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: _cube_data_offset(path) + 20])
    with pytest.raises(DataValidationError, match=r"cut\.npz.*Fix"):
        read_npz(path)


def test_a_verified_version_is_mapped_and_a_changed_one_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-reads map the member (one copy fewer); a changed file is read and checked, not mapped."""
    monkeypatch.setattr(npz_member, "MAP_MIN_BYTES", 1)
    path = tmp_path / "map.npz"
    arrays = _write(path)
    first = read_npz(path).cube
    assert not npz_member.is_mapped(first)  # first read: into memory, CRC checked
    again = read_npz(path).cube
    assert npz_member.is_mapped(again)  # verified version: mapped
    np.testing.assert_array_equal(again, arrays["cube"])
    again[0, 0, 0] = 42.0  # private copy-on-write mapping: the file is never written
    np.testing.assert_array_equal(read_npz(path).cube, arrays["cube"])
    _flip_a_cube_byte(path)
    with pytest.raises(DataValidationError, match="CRC"):
        read_npz(path)


def test_cached_frames_own_their_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodes.data.datamodule import CubeDataModule

    monkeypatch.setattr(npz_member, "MAP_MIN_BYTES", 1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"f{i}.npz")
        _write(paths[-1])
        read_npz(paths[-1])  # verified: the data module's reads map them
    dm = CubeDataModule(paths, train_ids=[0], val_ids=[1], test_ids=[2], batch_size=1)
    dm.setup()
    assert all(not npz_member.is_mapped(dm.get_frame(i).cube) for i in range(3))
    lean = CubeDataModule(paths, train_ids=[0], val_ids=[1], test_ids=[2], batch_size=1,
                          cache_bytes=0)
    lean.setup()
    assert npz_member.is_mapped(lean.get_frame(0).cube)  # re-read on demand: mapped


def test_a_verified_version_is_reread_from_its_recorded_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-reads skip the zip directory and the .npy headers; a changed file is parsed again."""
    monkeypatch.setattr(npz_member, "MAP_MIN_BYTES", 1)
    path = tmp_path / "layout.npz"
    arrays = _write(path)
    first = read_npz(path)
    real_load = np.load

    def no_load(*a: object, **k: object) -> object:
        raise AssertionError("np.load on a re-read of a verified version")

    monkeypatch.setattr(np, "load", no_load)
    again = read_npz(path)
    for key in ("cube", "mask", "class_mask", "wavelengths"):
        got = getattr(again, key) if key != "wavelengths" else again.wavelengths
        want = getattr(first, key)
        assert got is not None and want is not None
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again.cube, arrays["cube"])
    assert npz_member.is_mapped(again.cube)
    got_arrays, names = npz_member.read_verified(path, ("cube", "class_mask", "absent")) or ({}, ())
    assert set(got_arrays) == {"cube", "class_mask"} and "mask" in names
    assert got_arrays["class_mask"].flags.f_contiguous  # stored Fortran order kept
    np.testing.assert_array_equal(got_arrays["class_mask"], arrays["class_mask"])
    # A new version (size or mtime) is not served from the old layout: read and checked again.
    _flip_a_cube_byte(path)
    assert npz_member.read_verified(path, ("cube",)) is None
    monkeypatch.setattr(np, "load", real_load)
    with pytest.raises(DataValidationError, match="CRC"):
        read_npz(path)


def test_compressed_archives_are_never_served_from_a_layout(tmp_path: Path) -> None:
    path = tmp_path / "z.npz"
    _write(path, compressed=True)
    read_npz(path)
    read_npz(path)
    assert npz_member.read_verified(path, ("cube",)) is None


def test_only_the_newest_file_versions_are_remembered(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(npz_member, "MAX_VERIFIED", 2)
    monkeypatch.setattr(npz_member, "_LAYOUTS", {})
    paths = [tmp_path / f"v{i}.npz" for i in range(3)]
    for p in paths:
        _write(p)
        read_npz(p)
    remembered = {t[0] for t in npz_member._LAYOUTS}
    assert remembered == {str(paths[1]), str(paths[2])}
    assert npz_member.read_verified(paths[0], ("cube",)) is None  # forgotten: checked again
    np.testing.assert_array_equal(read_npz(paths[0]).cube, read_npz(paths[2]).cube)
    assert str(paths[0]) in {t[0] for t in npz_member._LAYOUTS}
