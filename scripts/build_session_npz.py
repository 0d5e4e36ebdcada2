"""Build the bundled session as one multi-frame ``.npz`` (the SDK-free stand-in for a ``.cu3s``).

Reads the five Los Angeles ABU scenes of ``data/session/`` (frame ids 0-4 in file-name order,
as ``params.yaml`` lists them) and writes ``cube`` (5, 100, 100, 205), ``mask``, ``class_mask``
and ``frame_names`` to one file that ``SingleCu3sDataModule(cu3s_file_path=...)`` reads with the
reference guide's ``train_ids=[0, 1, 2], val_ids=[3], test_ids=[4]``.

    .venv/bin/python scripts/build_session_npz.py                 # -> outputs/session.npz
    .venv/bin/python scripts/build_session_npz.py --out other.npz --scenes data/session

The output stays out of ``data/`` so the DVC-tracked data directory is not changed; the same
scenes always give the same arrays (the script prints their SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from nodes.data.readers import read_frames, write_session_npz  # noqa: E402
from nodes.errors import DataValidationError  # noqa: E402


def build_session_npz(scenes: Path, out: Path, *, compress: bool = True) -> dict[str, object]:
    """Write the ``.mat`` scenes of ``scenes`` (sorted by name) to ``out``; returns a summary."""
    paths = sorted(scenes.glob("*.mat"))
    if not paths:
        raise DataValidationError(
            f"{scenes}: no .mat scenes found. Fix: run `dvc pull` (or bash scripts/setup.sh) to "
            "restore data/session/, or pass --scenes."
        )
    frames = [f for p in paths for f in read_frames(p)]
    write_session_npz(frames, out, frame_names=[p.stem for p in paths], compress=compress)
    digest = hashlib.sha256()
    for f in frames:
        digest.update(np.ascontiguousarray(f.cube).tobytes())
        digest.update(np.ascontiguousarray(f.mask).tobytes())
    return {
        "out": str(out),
        "frames": [p.stem for p in paths],
        "shape": list(frames[0].cube.shape),
        "anomaly_pixels": [int(f.mask.sum()) for f in frames],
        "arrays_sha256": digest.hexdigest(),
        "bytes": out.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=Path, default=ROOT / "data" / "session",
                    help="folder of .mat scenes (default: data/session)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "session.npz",
                    help="output .npz (default: outputs/session.npz)")
    ap.add_argument("--no-compress", action="store_true", help="store the arrays uncompressed")
    args = ap.parse_args(argv)
    summary = build_session_npz(args.scenes, args.out, compress=not args.no_compress)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
