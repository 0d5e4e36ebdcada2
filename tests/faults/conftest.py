"""Fixtures of the fault suite: one prepared repository copy per session, copied cheaply per case.

Input cases run the CLI in this process (``flows.cli.main(argv)`` returns the exit code instead
of ending the process); cases that start a Prefect server or kill processes are ``slow`` and run
the CLI as a subprocess.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import children_of_this_process
from tests.flows.helpers import FAST_PARAMS, copy_repo, edit_params


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here carries the ``faults`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def prepared_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository (tracked files) with fast params, once per session."""
    root = copy_repo(tmp_path_factory.mktemp("faults") / "repo")
    edit_params(root, **FAST_PARAMS)
    return root


@pytest.fixture()
def repo(prepared_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared repository for one case."""
    dst = tmp_path / "repo"
    shutil.copytree(prepared_repo, dst, symlinks=True)
    return dst


@pytest.fixture()
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> Iterator[Callable[..., tuple[int, str]]]:
    """``cli(repo, "run", ...)`` → ``(exit code, stderr)``, in this process."""
    from flows.cli import main

    before = children_of_this_process()

    def run(root: Path, *argv: str) -> tuple[int, str]:
        monkeypatch.chdir(root)
        monkeypatch.setenv("CUBELINE_ROOT", str(root))
        capsys.readouterr()
        rc = main(["--params", str(root / "params.yaml"), *argv])
        return rc, capsys.readouterr().err

    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CUBELINE_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    yield run
    assert children_of_this_process() <= before, "a fault case left a process behind"
    os.environ.pop("CUBELINE_VERBOSE", None)
