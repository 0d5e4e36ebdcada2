"""Helpers of the flow tests: repository copies, params edits, a local Prefect server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def git(root: Path, *args: str) -> str:
    """Run git in ``root`` and return its stdout."""
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout


def copy_repo(dst: Path) -> Path:
    """Copy the working tree as git sees it (tracked + unignored files) into a fresh git repo.

    Ignored files (``data/``, ``.venv``, caches) stay behind: flows must restore the data with
    DVC from the repository's remote, as on a fresh clone.
    """
    files = git(REPO, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git(dst, "init", "-q")
    git(dst, "add", "-A")
    git(dst, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return dst


def edit_params(root: Path, **sections: dict[str, Any]) -> Path:
    """Update sections of ``root/params.yaml`` (nested keys merged one level deep).

    Commits the change so that it does not count as a change a flow made.
    """
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(doc[name].get(key), dict):
                doc[name][key].update(value)
            else:
                doc[name][key] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "params")
    return path


#: Phase 2 short enough for tests; the gate's absolute threshold low enough to pass after it.
FAST_PARAMS: dict[str, dict[str, Any]] = {
    "phase2": {"trainer": {"max_epochs": 2}},
    "registry": {"gate": {"absolute_thresholds": {"metrics_anomaly/auroc": 0.5}}},
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_server_command(port: int) -> list[str]:
    """``prefect server start`` on 127.0.0.1:``port`` without the UI, in this interpreter."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(port), "--no-ui"]


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``<url>/health`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")
