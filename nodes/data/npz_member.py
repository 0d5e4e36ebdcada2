"""Reading one array of an ``.npz`` archive straight from the file, for the readers.

Kept apart from :mod:`nodes.data.readers` (which is past 600 lines) since it is the one piece of
the data path that touches the zip layout itself.

The first read of each version of a file (its size and modification time) reads the member into
memory and checks its CRC-32; a re-read of a verified version (a data module without a frame
cache, every epoch) maps the member instead (a private, copy-on-write mapping of the page cache),
so the batch that stacks it is the only copy of the frame's bytes. A file changed since it was
verified is read and checked again, never mapped. Frames kept for long (a data module's cache) are
copied out of the mapping (:func:`is_mapped`), so a file truncated in place later cannot fault.

Verifying a version also records where each member's data lies (offset, shape, dtype): a
re-read of that version (:func:`read_verified`) opens the file once and maps or reads the
members from there, without parsing the zip directory and the ``.npy`` headers again (half of a
re-read's cost, ~0.3 ms per frame, next to ~1 ms of summing it in Phase 1).
"""

from __future__ import annotations

import mmap
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_VERIFIED_LOCK = threading.Lock()
#: Members at least this large are mapped on re-reads; smaller ones are simply read.
MAP_MIN_BYTES = 1 << 20
#: File versions remembered as verified (with their member layouts), the newest kept.
MAX_VERIFIED = 1 << 16


@dataclass(frozen=True)
class _Layout:
    """Where a verified, stored (uncompressed) member's array data lies in its file."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the array data."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


#: The members whose CRC-32 was checked, per file version (file, size, mtime): the archive's
#: member names and each verified member's layout. A file is verified once per version; re-reads
#: of it (a data module without a frame cache) skip the CRC and the parsing.
_LAYOUTS: dict[tuple[str, int, int], tuple[tuple[str, ...], dict[str, _Layout]]] = {}


def read_member(path: Path, npz: Any, key: str) -> np.ndarray:
    """Array ``key`` of an open ``NpzFile``, read straight from the file where it is stored.

    An uncompressed member (``np.savez``) is read with one ``readinto`` into its final array,
    instead of through the zip stream's buffered reads and a copy; its CRC-32 is checked the
    first time each version of the file is read. Compressed members, and anything unusual, take
    NumPy's own path. Raises what NumPy's path raises for a truncated or corrupt member.
    """
    zf = npz.zip
    info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return np.asarray(npz[key])
    st = path.stat()
    tag = (str(path), st.st_size, st.st_mtime_ns, key)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header of member {key}.npy")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
            local[28:30], "little")
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if dtype.hasobject:
            return np.asarray(npz[key])  # NumPy refuses it (allow_pickle=False) with its message
        head_len = fh.tell() - start
        layout = _Layout(fh.tell(), tuple(int(d) for d in shape), dtype, fortran)
        if layout.nbytes + head_len > info.file_size:
            raise EOFError(f"member {key}.npy is shorter than its header says")
        with _VERIFIED_LOCK:
            verified = key in _LAYOUTS.get(tag[:3], ((), {}))[1]
        if verified and layout.nbytes >= MAP_MIN_BYTES and not fortran:
            mapped = _map(fh, st.st_size, layout)
            if mapped is not None:
                return mapped
        out, raw = _read_array(fh, layout, key)
        if not verified:
            fh.seek(start)
            crc = zlib.crc32(raw.data, zlib.crc32(fh.read(head_len)))
            if crc != info.CRC:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file '{key}.npy'")
            _remember(tag, tuple(npz.files), layout)
    return out


def _remember(tag: tuple[str, int, int, str], names: tuple[str, ...], layout: _Layout) -> None:
    """Record a verified member and its layout.

    The oldest file versions are forgotten past :data:`MAX_VERIFIED` (a long-running process
    reads new frames for ever); a forgotten version is simply read and checked again.
    """
    with _VERIFIED_LOCK:
        _LAYOUTS.setdefault(tag[:3], (names, {}))[1][tag[3]] = layout
        while len(_LAYOUTS) > MAX_VERIFIED:
            del _LAYOUTS[next(iter(_LAYOUTS))]  # dicts keep insertion order: the oldest


def read_verified(path: Path, keys: tuple[str, ...]
                  ) -> tuple[dict[str, np.ndarray], tuple[str, ...]] | None:
    """The members ``keys`` (those the archive has) of a verified version, by their layouts.

    Args:
        path: The ``.npz`` file.
        keys: Member names wanted (without ``.npy``).

    Returns:
        ``(arrays, names of all the archive's members)``, or None where this version of the
        file (size, modification time) was not verified, or a wanted member is compressed or
        not verified yet: then the caller reads it through NumPy and :func:`read_member`.

    Raises:
        EOFError: The file is shorter than the recorded layout (changed meanwhile).
    """
    st = path.stat()
    with _VERIFIED_LOCK:
        entry = _LAYOUTS.get((str(path), st.st_size, st.st_mtime_ns))
    if entry is None:
        return None
    names, layouts = entry
    wanted = [k for k in keys if k in names]
    if any(k not in layouts for k in wanted):
        return None
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh:
        for key in wanted:
            lay = layouts[key]
            if lay.nbytes >= MAP_MIN_BYTES and not lay.fortran:
                mapped = _map(fh, st.st_size, lay)
                if mapped is None:
                    return None  # the file changed size since the stat: read it afresh
                arrays[key] = mapped
            else:
                arrays[key] = _read_array(fh, lay, key)[0]
    return arrays, names


def _read_array(fh: Any, layout: _Layout, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The member's array read with one ``readinto``, and its bytes (for the CRC)."""
    out = np.empty(layout.shape, dtype=layout.dtype, order="F" if layout.fortran else "C")
    raw = out.reshape(-1, order="A").view(np.uint8)
    fh.seek(layout.offset)
    if raw.size and fh.readinto(raw.data) != raw.size:
        raise EOFError(f"member {key}.npy is truncated")
    return out, raw


def _map(fh: Any, size: int, layout: _Layout) -> np.ndarray | None:
    """A C-ordered array over the member's bytes in the open file, None if it changed size.

    The mapping is private and copy-on-write (writes never reach the file); it lives as long as
    the array does.
    """
    try:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    if len(m) != size or layout.offset + layout.nbytes > len(m):
        m.close()
        return None
    return np.ndarray(layout.shape, dtype=layout.dtype, buffer=m, offset=layout.offset)


def is_mapped(a: np.ndarray) -> bool:
    """Whether ``a`` (or the array it views) lies in a file mapping made by :func:`read_member`."""
    base: Any = a
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap)
