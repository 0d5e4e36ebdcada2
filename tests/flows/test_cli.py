"""The ``cubeline`` command as a user meets its errors: one line, an exit code by kind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.helpers import REPO


def _cubeline(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"cubeline {command}: error:")]
    assert len(lines) == 1, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("command", ["run", "train", "drift"])
def test_params_mistake_fails_fast_with_exit_2(tmp_path: Path, command: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("  n_select:", "  n_selec:"))
    start = time.monotonic()
    proc = _cubeline("--params", str(params), command)
    assert time.monotonic() - start < 10  # no server start-up before the check (~0.4 s here)
    assert proc.returncode == 2
    err = _one_error_line(proc, command)
    assert "pipeline.n_selec" in err and "n_select" in err and str(params) in err


def test_bad_frames_exit_3_and_bad_hash_exit_2(tmp_path: Path) -> None:
    bogus = tmp_path / "frame.mat"
    bogus.write_bytes(b"not a MATLAB file")
    proc = _cubeline("ingest", str(bogus), str(bogus.with_name("other.mat")))
    assert proc.returncode == 3
    assert "other.mat" in _one_error_line(proc, "ingest")
    proc = _cubeline("run", "--data-version", "nothex")
    assert proc.returncode == 2
    assert "not a data-version hash" in _one_error_line(proc, "run")
