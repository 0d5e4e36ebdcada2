"""Fixtures of the reference-guide tests: the guide's text, the bundled session, its graph.

The guide (``../shared/reference/two-phase-training.md``) is someone else's text: its snippets
are reproduced in the tests with only the imports (``from nodes import ...``), the data paths
(the bundled session) and the band count (205) changed, each next to the guide section it comes
from. :func:`guide_lines` checks that the lines reproduced are still in the guide, so a changed
guide fails here instead of drifting away from what is tested.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guide.helpers import GUIDE, SESSION


@pytest.fixture(scope="session")
def guide_text() -> str:
    """The guide as the users handed it to us (skips where the shared folder is absent)."""
    if not GUIDE.is_file():
        pytest.skip(f"{GUIDE} not found")
    return GUIDE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def guide_lines(guide_text: str) -> Callable[..., None]:
    """Assert that each given line occurs in the guide (whitespace-trimmed, verbatim)."""
    lines = {line.strip() for line in guide_text.splitlines()}

    def check(*wanted: str) -> None:
        missing = [w for w in wanted if w.strip() not in lines]
        assert not missing, f"the guide no longer has {missing}; update the reproduced snippet"

    return check


@pytest.fixture(scope="session")
def session_mats() -> list[Path]:
    """The five Los Angeles scenes (frame ids 0-4: airport-1..3, urban-4, urban-5)."""
    paths = sorted(SESSION.glob("*.mat"))
    if len(paths) != 5:
        pytest.skip("bundled session not restored (run `dvc pull` or scripts/setup.sh)")
    return paths


@pytest.fixture(scope="session")
def session_npz(session_mats: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled session as one multi-frame .npz, as scripts/build_session_npz.py writes it."""
    from nodes.data.readers import read_frames, write_session_npz

    frames = [f for p in session_mats for f in read_frames(p, validate=False)]
    out = tmp_path_factory.mktemp("session") / "session.npz"
    return write_session_npz(frames, out, frame_names=[p.stem for p in session_mats],
                             compress=False)
