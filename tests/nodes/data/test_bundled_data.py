"""The bundled scenes: data.dvc + in-repo remote restore data/ bit-exact on a fresh clone.

The checksums come from the shared ABU copy's SHA256SUMS (the published files), so these tests
fail if the bundle, the remote or `dvc pull` would hand out different bytes.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_SUMS = REPO_ROOT.parent / "shared" / "data" / "abu" / "SHA256SUMS"
SESSION = ["abu-airport-1", "abu-airport-2", "abu-airport-3", "abu-urban-4", "abu-urban-5"]
EXTRA = ["abu-urban-1", "abu-urban-2", "abu-beach-3"]
EXPECTED_RELPATHS = {f"session/{n}.mat" for n in SESSION} | {f"extra/{n}.mat" for n in EXTRA}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _published_sums() -> dict[str, str]:
    """Scene file name -> sha256, from the shared copy, else from the bundle's own list."""
    if SHARED_SUMS.is_file():
        text = SHARED_SUMS.read_text()
    elif (REPO_ROOT / "data" / "SHA256SUMS").is_file():
        text = (REPO_ROOT / "data" / "SHA256SUMS").read_text()
    else:
        pytest.skip("no SHA256SUMS available")
    sums = {}
    for line in text.splitlines():
        digest, name = line.split()
        sums[Path(name).name] = digest
    return sums


def _data_dvc() -> dict[str, Any]:
    path = REPO_ROOT / "data.dvc"
    if not path.is_file():
        pytest.skip("data.dvc not in this checkout")
    return yaml.safe_load(path.read_text())


def _dir_listing() -> list[dict[str, str]]:
    (out,) = _data_dvc()["outs"]
    md5 = out["md5"]
    obj = REPO_ROOT / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]
    return json.loads(obj.read_text())


def test_one_dvc_file_tracks_the_whole_data_folder() -> None:
    (out,) = _data_dvc()["outs"]
    assert out["path"] == "data" and out["md5"].endswith(".dir") and out["nfiles"] == 9
    assert not list(REPO_ROOT.glob("data/**/*.dvc"))


def test_dvc_config_is_offline_with_relative_in_repo_remote() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / ".dvc" / "config")
    assert cfg["core"]["analytics"] == "false" and cfg["core"]["check_update"] == "false"
    remote = cfg["core"]["remote"]
    url = cfg[f"'remote \"{remote}\"'"]["url"]
    assert not Path(url).is_absolute()
    assert (REPO_ROOT / ".dvc" / url).resolve() == (REPO_ROOT / "dvc-remote").resolve()


def test_remote_holds_every_scene_bit_exact() -> None:
    """The committed remote objects are the published files (no dvc needed to check)."""
    listing = _dir_listing()
    assert {e["relpath"] for e in listing} == EXPECTED_RELPATHS | {"SHA256SUMS"}
    sums = _published_sums()
    for entry in listing:
        obj = REPO_ROOT / "dvc-remote" / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
        data = obj.read_bytes()
        assert hashlib.md5(data).hexdigest() == entry["md5"]  # DVC names objects by md5
        if entry["relpath"].endswith(".mat"):
            assert hashlib.sha256(data).hexdigest() == sums[Path(entry["relpath"]).name]


@pytest.mark.slow
def test_fresh_clone_dvc_pull_restores_data(tmp_path: Path) -> None:
    dvc = Path(sys.executable).parent / "dvc"
    git = shutil.which("git")
    if not dvc.exists() or git is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git, a git checkout and the venv's dvc")
    clone = tmp_path / "clone"
    subprocess.run([git, "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    assert not (clone / "data").exists()  # data/ is not in git, only data.dvc + the remote
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "true"}
    subprocess.run([str(dvc), "pull", "-q"], cwd=clone, check=True, env=env, timeout=300)
    sums = _published_sums()
    restored = {p.relative_to(clone / "data").as_posix() for p in clone.glob("data/*/*.mat")}
    assert restored == EXPECTED_RELPATHS
    for rel in EXPECTED_RELPATHS:
        assert _sha256(clone / "data" / rel) == sums[Path(rel).name], rel
    # The bundle's own checksum list agrees too (what `sha256sum -c` would use offline).
    for line in (clone / "data" / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split()
        assert _sha256(clone / "data" / rel) == digest
