"""Checks every fault case makes: exit code, one error line, no traceback, no orphan, no debris."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

#: Environment marker every subprocess of a fault case inherits: /proc/<pid>/environ finds them.
MARK_ENV = "CUBELINE_FAULT_CASE"


def error_lines(err: str, command: str) -> list[str]:
    """The ``cubeline <command>: error:`` lines of ``err``."""
    return [ln for ln in err.splitlines() if ln.startswith(f"cubeline {command}: error:")]


def assert_clean_failure(rc: int, err: str, command: str, code: int, *needles: str) -> str:
    """Exit code ``code``, exactly one error line naming ``needles``, no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = error_lines(err, command)
    assert len(lines) == 1, err[-3000:]
    assert rc == code, (rc, lines[0])
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert " error: internal error" not in lines[0]
    return lines[0]


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment carries ``MARK_ENV=mark`` (not this one)."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def children_of_this_process() -> set[int]:
    """Live descendants of the test process."""
    import psutil

    return {
        p.pid for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE
    }


def run_states(root: Path) -> dict[str, int]:
    """MLflow run statuses in ``root/mlflow.db`` (empty without a store)."""
    db = root / "mlflow.db"
    if not db.is_file():
        return {}
    with sqlite3.connect(db) as con:
        return dict(con.execute("select status, count(*) from runs group by status").fetchall())


def undecided_versions(root: Path) -> list[str]:
    """Registered versions with no gate decision tag (``cubeline.decision*``) and no alias."""
    db = root / "mlflow.db"
    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        versions = con.execute("select name, version from model_versions").fetchall()
        tagged = {
            (n, str(v)) for n, v in con.execute(
                "select name, version from model_version_tags where key like 'cubeline.%decision%'"
                " or key like 'cubeline.gate%'"
            ).fetchall()
        }
        aliased = {
            (n, str(v)) for n, v in con.execute(
                "select name, version from registered_model_aliases"
            ).fetchall()
        }
    return [f"{n} v{v}" for n, v in versions if (n, str(v)) not in tagged | aliased]


def tree(root: Path) -> set[str]:
    """Relative paths of the files under ``root``.

    ``.git`` and ``__pycache__`` are left out: the latter holds Python's and Numba's compiled
    caches (``nodes/kernels.py`` caches its loops there on first use), not outputs of a run.
    """
    return {
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and not {".git", "__pycache__"} & set(p.relative_to(root).parts)
    }
