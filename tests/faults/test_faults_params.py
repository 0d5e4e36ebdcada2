"""Bad params.yaml and bad arguments: one error line, exit 2, before any server starts (< 2 s)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.faults.helpers import assert_clean_failure, run_states, tree


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return edit


def _drop(section: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(section)


PARAM_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "n_select_negative": (_set("pipeline.n_select", -3), "n_select"),
    "n_select_above_bands": (_set("pipeline.n_select", 100000), "n_select"),
    "n_select_string": (_set("pipeline.n_select", "ten"), "n_select"),
    "eps_zero": (_set("pipeline.eps", 0), "eps"),
    "eps_nan": (_set("pipeline.eps", float("nan")), "eps"),
    "temperature_zero": (_set("pipeline.temperature_init", 0), "temperature_init"),
    "threshold_one": (_set("pipeline.threshold", 1.0), "threshold"),
    "selector_mode": (_set("pipeline.selector_mode", "fuzzy"), "selector_mode"),
    "unknown_key": (_set("pipeline.n_selec", 3), "n_selec"),
    "gate_metric_typo": (_set("registry.gate.metric", "metrics_anomaly/aurocc"), "aurocc"),
    "gate_threshold_typo": (_set("registry.gate.absolute_thresholds", {"auroc": 0.5}), "auroc"),
    "gate_mode": (_set("registry.gate.mode", "up"), "mode"),
    "model_name_slash": (_set("registry.model_name", "team/model:1"), "model_name"),
    "model_name_empty": (_set("registry.model_name", ""), "model_name"),
    "test_overlaps_train": (_set("data.test_ids", [0]), "test_ids"),
    "negative_frame_id": (_set("data.train_ids", [-1]), "train_ids"),
    "degenerate_policy": (_set("phase1.degenerate", "ignore"), "degenerate"),
    "ridge_negative": (_set("phase1.ridge", -1.0), "ridge"),
    "max_epochs_zero": (_set("phase2.trainer.max_epochs", 0), "max_epochs"),
    "target_fpr": (_set("threshold.target_fpr", 2.0), "target_fpr"),
    "cron": (_set("schedule.retrain_cron", "daily"), "retrain_cron"),
    "no_data_section": (_drop("data"), "data"),
}


@pytest.mark.parametrize("command", ["run", "train"])
@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_bad_params_fail_before_anything_starts(
    repo: Path, cli: Callable[..., tuple[int, str]], case: str, command: str
) -> None:
    edit, needle = PARAM_CASES[case]
    path = repo / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    before = tree(repo)
    start = time.monotonic()
    rc, err = cli(repo, command)
    assert time.monotonic() - start < 2.0
    assert_clean_failure(rc, err, command, 2, needle, "params.yaml")
    assert tree(repo) == before and run_states(repo) == {}


@pytest.mark.parametrize(
    "text",
    [
        "a: [\n",  # unclosed flow sequence
        "data:\n\tpaths: []\n",  # a tab
        "- just\n- a list\n",  # not a mapping
        "",  # empty
        "data: !!python/object/apply:os.system ['touch PWNED']\n",  # a tag that runs code
        "\x00\x01binary",
        b"data:\n  paths: [caf\xe9.npz]\n",  # Latin-1, not UTF-8
        "data: {}\n".encode("utf-16"),  # UTF-16 with its BOM
        b"\xff\xfe\x00\x01\x89PNG",  # binary that is no text at all
    ],
    ids=["unclosed", "tab", "list", "empty", "python_tag", "binary", "latin1", "utf16",
         "not_text"],
)
def test_malformed_params_yaml(repo: Path, cli: Callable[..., tuple[int, str]],
                               text: str | bytes) -> None:
    target = repo / "params.yaml"
    if isinstance(text, bytes):
        target.write_bytes(text)
    else:
        target.write_text(text)
    rc, err = cli(repo, "run")
    assert_clean_failure(rc, err, "run", 2, "params.yaml")
    assert not (repo / "PWNED").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"outs: [\n", b"outs: 3\n"],
                         ids=["not_text", "bad_yaml", "no_outs"])
def test_malformed_data_dvc(repo: Path, cli: Callable[..., tuple[int, str]], content: bytes
                            ) -> None:
    (repo / "data.dvc").write_bytes(content)
    rc, err = cli(repo, "run")
    assert_clean_failure(rc, err, "run", 2, "data.dvc")


def test_missing_params_file(repo: Path, cli: Callable[..., tuple[int, str]]) -> None:
    (repo / "params.yaml").unlink()
    rc, err = cli(repo, "train")
    assert_clean_failure(rc, err, "train", 2, "params.yaml")


def test_bad_data_version_argument(repo: Path, cli: Callable[..., tuple[int, str]]) -> None:
    rc, err = cli(repo, "run", "--data-version", "nothex")
    assert_clean_failure(rc, err, "run", 2, "nothex")


def test_unreachable_prefect_api(repo: Path, cli: Callable[..., tuple[int, str]],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.flows.helpers import free_port

    port = free_port()
    rc = 0
    for command in ("run", "drift"):
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
        rc, err = cli(repo, command)
        assert_clean_failure(rc, err, command, 11, "PREFECT_API_URL", f"127.0.0.1:{port}")


def test_dangling_symlink_in_data(repo: Path, cli: Callable[..., tuple[int, str]]) -> None:
    session = repo / "data" / "session"
    session.mkdir(parents=True, exist_ok=True)
    (session / "ghost.mat").symlink_to(repo / "nowhere.mat")
    start = time.monotonic()
    rc, err = cli(repo, "run")
    assert time.monotonic() - start < 2.0
    assert_clean_failure(rc, err, "run", 9, "ghost.mat", "dangling")
