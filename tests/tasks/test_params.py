"""params.yaml loading, validation messages and section hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodes.errors import ConfigError
from nodes.training.config import TrainingConfig
from nodes.training.drift import DriftThresholds
from tasks.params import Params, load_params, resolve_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def params_file(tmp_path: Path) -> Path:
    dst = tmp_path / "params.yaml"
    dst.write_text((REPO / "params.yaml").read_text())
    return dst


def _edit(path: Path, section: str, key: str, value: object) -> None:
    doc = yaml.safe_load(path.read_text())
    doc[section][key] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_repo_params_load() -> None:
    p = load_params(REPO)
    assert isinstance(p.phase2, TrainingConfig)
    assert p.data.train_ids and p.data.val_ids and p.data.test_ids
    assert isinstance(p.drift.thresholds(), DriftThresholds)
    assert p.drift.thresholds().mean_shift == p.drift.mean_shift
    for rel in p.data.paths:
        assert resolve_path(REPO / "params.yaml", rel).suffix in {".mat", ".npz", ".cu3s"}


def test_unknown_key_names_field_and_file(params_file: Path) -> None:
    _edit(params_file, "phase1", "normal_onyl", True)
    with pytest.raises(ConfigError) as exc:
        load_params(params_file)
    msg = str(exc.value)
    assert "phase1.normal_onyl" in msg
    assert str(params_file) in msg
    assert "normal_only" in msg  # the did-you-mean hint


def test_nested_phase2_error_is_named(params_file: Path) -> None:
    doc = yaml.safe_load(params_file.read_text())
    doc["phase2"]["optimizer"]["lr"] = -1
    params_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"phase2\.optimizer\.lr"):
        load_params(params_file)


def test_bad_cron_and_missing_data(params_file: Path) -> None:
    _edit(params_file, "schedule", "retrain_cron", "every monday")
    with pytest.raises(ConfigError, match="5 fields"):
        load_params(params_file)
    params_file.write_text("pipeline: {}\n")
    with pytest.raises(ConfigError, match="no 'data' section"):
        load_params(params_file)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(params_file.parent / "nope.yaml")


def test_section_hash_is_stable_and_local(params_file: Path) -> None:
    base = load_params(params_file)
    # Reordering keys and adding comments changes nothing.
    doc = yaml.safe_load(params_file.read_text())
    reordered = {k: doc[k] for k in reversed(list(doc))}
    params_file.write_text("# a comment\n" + yaml.safe_dump(reordered, sort_keys=True))
    same = load_params(params_file)
    assert same.section_hash() == base.section_hash()
    # A value change moves exactly the sections that hold it.
    _edit(params_file, "phase1", "seed", base.phase1.seed + 1)
    changed = load_params(params_file)
    assert changed.section_hash("phase1") != base.section_hash("phase1")
    assert changed.section_hash("data", "pipeline") == base.section_hash("data", "pipeline")
    assert changed.section_hash() != base.section_hash()
    # Defaults filled in: writing a default explicitly does not move the hash.
    _edit(params_file, "phase1", "seed", base.phase1.seed)
    _edit(params_file, "phase1", "sample_fraction", None)
    assert load_params(params_file).section_hash("phase1") == base.section_hash("phase1")


def test_section_hash_rejects_unknown_section() -> None:
    p = load_params(REPO)
    with pytest.raises(ConfigError, match=r"unknown params\.yaml section"):
        p.section_hash("phase3")


def test_params_are_frozen() -> None:
    p = load_params(REPO)
    with pytest.raises(ConfigError, match="frozen"):
        p.data.batch_size = 2
    assert isinstance(p, Params)


def test_gate_metric_typo_is_refused_before_anything_runs(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "params.yaml").read_text()
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace("metric: metrics_anomaly/auroc", "metric: metrics_anomaly/aurcc"))
    with pytest.raises(ConfigError, match=r"aurcc.*Did you mean 'metrics_anomaly/auroc'"):
        load_params(bad)


def test_gate_metrics_are_what_the_metric_node_reports() -> None:
    import torch

    from nodes.library.metrics import AnomalyDetectionMetrics
    from tasks.params import GATE_METRICS

    node = AnomalyDetectionMetrics(name="metrics_anomaly")
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, 0, 0] = True
    node(decisions=target.clone(), targets=target, logits=target.float())
    assert sorted(f"metrics_anomaly/{k}" for k in node.compute()) == sorted(GATE_METRICS)


def test_test_frames_shared_with_training_are_refused(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    bad = tmp_path / "params.yaml"
    bad.write_text((repo / "params.yaml").read_text().replace("train_ids: [0, 1, 2]",
                                                                "train_ids: [0, 1, 2, 4]"))
    with pytest.raises(ConfigError, match=r"frames \[4\] are in both train_ids and test_ids"):
        load_params(bad)
