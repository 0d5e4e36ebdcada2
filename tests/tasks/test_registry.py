"""Promotion gate, aliases, champion history, rollback and fault tolerance of tasks/registry.py.

A real MLflow SQLite store in a temporary directory (one per module; each test uses its own
registered-model name), real Prefect transactions, real subprocesses for kill and concurrency.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes.errors import ConfigError
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    FAULT_ENV,
    GateConfig,
    InjectedFaultError,
    RegistryError,
    champion_history,
    decide_promotion,
    get_alias_version,
    promote_version,
    register_and_promote,
    rollback,
    split_id_of,
    version_metrics,
)

REPO = Path(__file__).resolve().parents[2]
SPLIT = split_id_of(["abu-urban-5"], "md5:test")
OTHER_SPLIT = split_id_of(["abu-urban-4"], "md5:test")
GATE = GateConfig(
    metric="metrics_anomaly/auroc",
    mode="max",
    min_improvement=0.01,
    absolute_thresholds={"metrics_anomaly/auroc": 0.8},
)


def m(auroc: float, **extra: float) -> dict[str, float]:
    return {"metrics_anomaly/auroc": auroc, "metrics_anomaly/ap": 0.5, **extra}


# --------------------------------------------------------------------------------------------
# The gate: a pure function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "words"),
    [
        (m(0.90), m(0.85), True, "beats"),
        (m(0.855), m(0.85), False, "below the margin"),
        (m(0.83), m(0.82), True, "beats"),  # exactly the margin, despite 0.83-0.82 < 0.01 in fp
        (m(0.85), m(0.85), False, "equals"),
        (m(0.84), m(0.85), False, "worse"),
        (m(0.95), None, True, "no champion"),
        (m(0.79), None, False, "absolute thresholds"),
        (m(0.79), m(0.70), False, "absolute thresholds"),  # thresholds apply with a champion too
        (m(math.nan), None, False, "NaN"),
        (m(0.95), {"metrics_anomaly/ap": 0.4}, False, "not comparable"),  # champion lacks it
    ],
)
def test_decide_promotion_table(
    challenger: dict[str, float], champion: dict[str, float] | None, promote: bool, words: str
) -> None:
    d = decide_promotion(
        challenger, champion, GATE, challenger_split_id=SPLIT, champion_split_id=SPLIT
    )
    assert d.promote is promote, d.reason
    assert words in d.reason


def test_equal_never_promotes_even_without_margin() -> None:
    gate = GateConfig(metric="metrics_anomaly/auroc", min_improvement=0.0)
    d = decide_promotion(m(0.9), m(0.9), gate, challenger_split_id=SPLIT, champion_split_id=SPLIT)
    assert not d.promote
    assert decide_promotion(
        m(0.9000001), m(0.9), gate, challenger_split_id=SPLIT, champion_split_id=SPLIT
    ).promote


def test_min_mode_lower_is_better() -> None:
    gate = GateConfig(
        metric="loss", mode="min", min_improvement=0.1, absolute_maximums={"loss": 1.0}
    )
    better = decide_promotion(
        {"loss": 0.5}, {"loss": 0.7}, gate, challenger_split_id=SPLIT, champion_split_id=SPLIT
    )
    worse = decide_promotion(
        {"loss": 0.7}, {"loss": 0.5}, gate, challenger_split_id=SPLIT, champion_split_id=SPLIT
    )
    too_high = decide_promotion({"loss": 1.5}, None, gate, challenger_split_id=SPLIT)
    assert better.promote and better.improvement == pytest.approx(0.2)
    assert not worse.promote and worse.improvement == pytest.approx(-0.2)
    assert not too_high.promote and "maximum" in too_high.reason


def test_different_split_is_refused() -> None:
    d = decide_promotion(
        m(0.99), m(0.5), GATE, challenger_split_id=SPLIT, champion_split_id=OTHER_SPLIT
    )
    assert not d.promote
    assert not d.comparable and d.needs_champion_reevaluation
    assert SPLIT in d.reason and OTHER_SPLIT in d.reason


def test_threshold_failure_needs_no_reevaluation() -> None:
    d = decide_promotion(
        m(0.5), m(0.4), GATE, challenger_split_id=SPLIT, champion_split_id=OTHER_SPLIT
    )
    assert not d.promote and not d.needs_champion_reevaluation


def test_missing_gate_metric_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"metrics_anomaly/auroc.*params\.yaml"):
        decide_promotion({"metrics_anomaly/ap": 0.9}, None, GATE, challenger_split_id=SPLIT)


def test_gate_config_rejects_unknown_keys_and_is_frozen() -> None:
    with pytest.raises(ConfigError, match=r"(?s)registry\.gate.*unknown field .margin"):
        GateConfig.from_mapping({"metric": "x", "margin": 0.1}, source="params.yaml:registry.gate")
    with pytest.raises(ConfigError, match="min_improvement"):
        GateConfig.from_mapping({"min_improvement": -1})
    with pytest.raises(ConfigError, match="frozen"):
        GATE.metric = "other"


def test_gate_may_be_another_pydantic_model_or_a_mapping() -> None:
    from pydantic import BaseModel

    class Section(BaseModel):  # a params.yaml section with the gate's fields
        metric: str
        min_improvement: float
        absolute_thresholds: dict[str, float]

    section = Section(
        metric="metrics_anomaly/auroc",
        min_improvement=0.01,
        absolute_thresholds={"metrics_anomaly/auroc": 0.8},
    )
    for gate in (section, section.model_dump()):
        d = decide_promotion(
            m(0.83), m(0.82), gate, challenger_split_id=SPLIT, champion_split_id=SPLIT
        )
        assert d.promote
        assert not decide_promotion(m(0.79), None, gate, challenger_split_id=SPLIT).promote
    with pytest.raises(ConfigError, match="mode"):
        decide_promotion(m(0.9), None, {"mode": "up"}, challenger_split_id=SPLIT)


def test_split_id_ignores_frame_order_but_not_data() -> None:
    assert split_id_of(["a", "b"], "h1") == split_id_of(["b", "a"], "h1")
    assert split_id_of(["a", "b"], "h1") != split_id_of(["a", "b"], "h2")
    assert split_id_of(["a"], "h1") != split_id_of(["a", "b"], "h1")


# --------------------------------------------------------------------------------------------
# Against a real MLflow registry
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import mlflow

    from tasks.tracking import configure_mlflow

    root = tmp_path_factory.mktemp("registry-store")
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = configure_mlflow(None, root, experiment_name="registry-tests")
    with mlflow.start_run() as run:
        pass
    yield {"uri": uri, "root": str(root), "run_id": run.info.run_id}
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


_counter = iter(range(10_000))


@pytest.fixture
def name(store: dict[str, str], request: pytest.FixtureRequest) -> str:
    return f"m{next(_counter)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")


def reg(store: dict[str, str], name: str, auroc: float, split: str = SPLIT, **kw: Any) -> Any:
    return register_and_promote(
        run_id=store["run_id"],
        model_uri=f"file://{store['root']}/fake-model-{auroc}",
        metrics=m(auroc),
        split_id=split,
        gate=GATE,
        model_name=name,
        reason_context=kw.pop("reason_context", "test"),
        **kw,
    )


def alias(name: str, which: str) -> str | None:
    mv = get_alias_version(name, which)
    return None if mv is None else str(mv.version)


def test_first_model_becomes_champion_and_challenger(store: dict[str, str], name: str) -> None:
    r = reg(store, name, 0.9, reason_context="first run")
    assert (r.version, r.champion_version, r.previous_champion_version) == ("1", "1", None)
    assert r.alias == CHAMPION and r.decision.promote
    assert alias(name, CHAMPION) == "1" and alias(name, CHALLENGER) == "1"
    mv = get_alias_version(name, CHAMPION)
    assert mv is not None
    assert version_metrics(mv, SPLIT) == m(0.9)
    assert mv.tags["cubeline.run_id"] == store["run_id"]
    assert mv.tags["cubeline.split_id"] == SPLIT
    assert mv.tags["metric.metrics_anomaly/auroc"] == "0.9"
    (h,) = champion_history(name)
    assert (h.version, h.action, h.previous_version, h.state) == ("1", "promote", None, "committed")
    assert "no champion" in h.reason and "first run" in h.reason


def test_first_model_below_thresholds_is_only_challenger(store: dict[str, str], name: str) -> None:
    r = reg(store, name, 0.7)
    assert not r.decision.promote and r.alias == CHALLENGER
    assert alias(name, CHAMPION) is None and alias(name, CHALLENGER) == "1"
    assert champion_history(name) == []


def test_better_promotes_worse_and_equal_stay(store: dict[str, str], name: str) -> None:
    reg(store, name, 0.85)
    better = reg(store, name, 0.90)
    assert better.decision.promote and alias(name, CHAMPION) == "2"
    worse = reg(store, name, 0.88)
    assert not worse.decision.promote and worse.champion_version == "2"
    equal = reg(store, name, 0.90)
    assert not equal.decision.promote and "equals" in equal.decision.reason
    assert alias(name, CHAMPION) == "2" and alias(name, CHALLENGER) == "4"
    hist = champion_history(name)
    assert [(h.version, h.previous_version, h.replaced_by) for h in hist] == [
        ("1", None, "2"),
        ("2", "1", None),
    ]
    assert hist[0].replaced_at == hist[1].at
    import mlflow

    tags = mlflow.MlflowClient().get_model_version(name, "3").tags
    assert tags["cubeline.decision"] == CHALLENGER and "worse" in tags["cubeline.decision_reason"]


def test_rollback_walks_back_and_is_recorded(store: dict[str, str], name: str) -> None:
    for auroc in (0.85, 0.90, 0.95):
        reg(store, name, auroc)
    assert alias(name, CHAMPION) == "3"
    e = rollback(name, "v3 misbehaves in production")
    assert (e.version, e.previous_version, e.action) == ("2", "3", "rollback")
    assert alias(name, CHAMPION) == "2"
    rollback(name, "v2 too")
    assert alias(name, CHAMPION) == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(name, "nothing left")
    assert alias(name, CHAMPION) == "1"
    hist = champion_history(name)
    assert [(h.version, h.action) for h in hist] == [
        ("1", "promote"),
        ("2", "promote"),
        ("3", "promote"),
        ("2", "rollback"),
        ("1", "rollback"),
    ]
    assert hist[3].reason == "v3 misbehaves in production"
    # A new promotion after rollbacks pushes on top of what is left.
    reg(store, name, 0.99)
    rollback(name, "back again")
    assert alias(name, CHAMPION) == "1"


def test_rollback_without_champion_or_after_outside_move(store: dict[str, str], name: str) -> None:
    import mlflow

    with pytest.raises(RegistryError, match="no champion"):
        rollback(name, "nothing registered")
    reg(store, name, 0.85)
    reg(store, name, 0.95)
    mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, "1")  # by hand, in the UI
    with pytest.raises(RegistryError, match="moved outside cubeline"):
        rollback(name, "confused")


def test_rollback_to_a_deleted_version_is_refused(store: dict[str, str], name: str) -> None:
    import mlflow

    reg(store, name, 0.85)
    reg(store, name, 0.95)
    mlflow.MlflowClient().delete_model_version(name, "1")
    with pytest.raises(RegistryError, match="version 1, no longer exists"):
        rollback(name, "v2 is bad")
    assert alias(name, CHAMPION) == "2"


def test_champion_on_another_split_is_reevaluated_by_the_hook(
    store: dict[str, str], name: str
) -> None:
    reg(store, name, 0.85, split=OTHER_SPLIT)
    no_hook = reg(store, name, 0.99)
    assert not no_hook.decision.promote and "re-evaluate" in no_hook.decision.reason
    seen: list[tuple[str, str]] = []

    def rescore(mv: Any, split: str) -> dict[str, float]:
        seen.append((str(mv.version), split))
        return m(0.97)

    r = reg(store, name, 0.99, reevaluate_champion=rescore)
    assert seen == [("1", SPLIT)]
    assert r.champion_reevaluated and r.decision.promote and r.champion_version == "3"
    assert r.decision.champion_value == pytest.approx(0.97)
    # The re-evaluation is stored on the old champion: no second call for the same split.
    mv1 = get_alias_version(name, CHALLENGER)
    assert mv1 is not None
    import mlflow

    old = mlflow.MlflowClient().get_model_version(name, "1")
    assert version_metrics(old, SPLIT) == m(0.97)
    assert version_metrics(old, OTHER_SPLIT) == m(0.85)


def test_promote_version_manual_and_gated(store: dict[str, str], name: str) -> None:
    reg(store, name, 0.95)
    reg(store, name, 0.90)
    gated = promote_version(name, 2, "try it", gate=GATE)
    assert not gated.promote and alias(name, CHAMPION) == "1"
    forced = promote_version(name, 2, "operator says so")
    assert forced.promote and alias(name, CHAMPION) == "2"
    assert champion_history(name)[-1].action == "manual"
    assert rollback(name, "undo manual").version == "1"
    with pytest.raises(RegistryError, match="no version 9"):
        promote_version(name, 9, "typo")


def test_get_alias_version_of_unknown_model_is_none(store: dict[str, str]) -> None:
    assert get_alias_version("no-such-model", CHAMPION) is None
    assert champion_history("no-such-model") == []


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point", ["after_challenger_alias", "before_champion_alias", "after_champion_alias"]
)
def test_failure_inside_the_transaction_leaves_the_old_champion(
    store: dict[str, str], name: str, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg(store, name, 0.85)
    reg(store, name, 0.80)  # challenger v2, champion v1
    monkeypatch.setenv(FAULT_ENV, f"{point}:raise")
    with pytest.raises(InjectedFaultError):
        reg(store, name, 0.95)
    monkeypatch.delenv(FAULT_ENV)
    assert alias(name, CHAMPION) == "1"
    assert alias(name, CHALLENGER) == "2"
    assert [h.version for h in champion_history(name)] == ["1"]
    aborted = [h for h in champion_history(name, include_aborted=True) if h.state != "committed"]
    assert [(h.version, h.state) for h in aborted] == (
        [] if point == "after_challenger_alias" else [("3", "aborted")]
    )
    # The registry is usable afterwards and the history stays one line.
    assert reg(store, name, 0.96).champion_version == "4"
    assert [(h.version, h.previous_version) for h in champion_history(name)] == [
        ("1", None),
        ("4", "1"),
    ]


def test_first_model_failure_leaves_no_champion(
    store: dict[str, str], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "after_champion_alias:raise")
    with pytest.raises(InjectedFaultError):
        reg(store, name, 0.95)
    assert alias(name, CHAMPION) is None and alias(name, CHALLENGER) is None


def test_enclosing_transaction_rollback_undoes_the_promotion(
    store: dict[str, str], name: str
) -> None:
    from prefect.transactions import transaction

    reg(store, name, 0.85)
    with pytest.raises(RuntimeError, match="later step"), transaction():
        assert reg(store, name, 0.95).champion_version == "2"
        raise RuntimeError("a later step of the same task failed")
    assert alias(name, CHAMPION) == "1" and alias(name, CHALLENGER) == "1"
    assert [h.version for h in champion_history(name)] == ["1"]
    import mlflow

    tags = mlflow.MlflowClient().get_model_version(name, "2").tags
    assert tags["cubeline.decision"] == "rolled_back"


def _child_script(
    store: dict[str, str], name: str, auroc: float, barrier: Path | None = None
) -> str:
    """A process that registers one model; with a barrier it waits for ``barrier/go`` first."""
    return textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from tasks.tracking import configure_mlflow
        configure_mlflow({store["uri"]!r}, Path({store["root"]!r}),
                         experiment_name="registry-tests")
        from tasks.registry import GateConfig, register_and_promote
        import prefect.transactions
        gate = GateConfig.model_validate_json({GATE.model_dump_json()!r})
        barrier = {str(barrier) if barrier else None!r}
        if barrier:
            Path(barrier, "ready-{auroc}").touch()
            while not Path(barrier, "go").exists():
                time.sleep(0.01)
        r = register_and_promote({store["run_id"]!r}, "file:///fake/{auroc}",
                                 {{"metrics_anomaly/auroc": {auroc}, "metrics_anomaly/ap": 0.5}},
                                 {SPLIT!r}, gate, {name!r}, "subprocess")
        print("RESULT", json.dumps(r.to_dict()))
        """
    )


def _spawn(script: str, fault: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# A version without aliases; a pending history entry with the old alias; the same with the new.
KILL_POINTS = ["after_create_version", "before_champion_alias", "after_champion_alias"]


@pytest.mark.slow
def test_sigkill_during_registration_leaves_old_or_new_champion(store: dict[str, str]) -> None:
    names = {p: f"kill-{p}" for p in KILL_POINTS}
    for n in names.values():
        reg(store, n, 0.85)
    # All kill points at once (each its own model): the imports dominate, so this costs one.
    procs = {p: _spawn(_child_script(store, names[p], 0.95), f"{p}:kill") for p in KILL_POINTS}
    for p, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == -9, f"{p}: not killed (rc {proc.returncode})\n{err[-2000:]}"
        assert "RESULT" not in out
    for p, n in names.items():
        champ = alias(n, CHAMPION)
        expected = "2" if p == "after_champion_alias" else "1"
        assert champ == expected, f"kill at {p}: champion {champ}"
        # The history agrees with the alias, pending entries included.
        hist = champion_history(n)
        assert hist[-1].version == champ, f"kill at {p}: history {hist}"
        # The next registration settles the pending entry and works.
        r = reg(store, n, 0.99)
        assert r.decision.promote and alias(n, CHAMPION) == r.version
        hist = champion_history(n)
        assert [h.previous_version for h in hist] == [None, *[h.version for h in hist[:-1]]]


@pytest.mark.slow
def test_two_concurrent_registrations_end_with_one_consistent_champion(
    store: dict[str, str], name: str, tmp_path: Path
) -> None:
    reg(store, name, 0.85)
    # Both processes start registering at the same instant (barrier), and the sleep widens the
    # read-decide-write window: without the lock both would compare with v1 and both promote,
    # leaving two history entries that replaced v1.
    procs = [
        _spawn(_child_script(store, name, auroc, tmp_path), "after_decision:sleep1.0")
        for auroc in (0.90, 0.95)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2:
        assert time.monotonic() < deadline, "children did not get ready"
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    versions = sorted(r["version"] for r in results)
    assert versions == ["2", "3"]
    best = next(r["version"] for r in results if r["decision"]["challenger_value"] == 0.95)
    assert alias(name, CHAMPION) == best
    hist = champion_history(name)
    assert [h.previous_version for h in hist] == [None, *[h.version for h in hist[:-1]]]
    assert hist[-1].version == best


def test_gate_floors_that_params_cannot_lower() -> None:
    """AUROC <= 0.5 or a non-finite threshold never promotes, whatever the gate says."""
    from tasks.registry import THRESHOLD_METRIC, decide_promotion

    lax = {"metric": "metrics_anomaly/ap", "min_improvement": 0.0, "absolute_thresholds": {}}
    good = {"metrics_anomaly/ap": 0.4, "metrics_anomaly/auroc": 0.9, THRESHOLD_METRIC: 1.5}
    assert decide_promotion(good, None, lax, challenger_split_id="s").promote
    chance = {**good, "metrics_anomaly/auroc": 0.5}
    d = decide_promotion(chance, None, lax, challenger_split_id="s")
    assert not d.promote and "no better than chance" in d.reason
    inf = {**good, THRESHOLD_METRIC: float("inf")}
    d = decide_promotion(inf, {"metrics_anomaly/ap": 0.1}, lax, challenger_split_id="s",
                         champion_split_id="s")
    assert not d.promote and "not finite" in d.reason
