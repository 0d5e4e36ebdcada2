"""Champion history: one small JSON artifact per change, in one MLflow run per model.

The artifacts ``champion_history/<seq>.json`` of the run ``champion-history-<model>`` (found
through the registered-model tag ``cubeline.history_run_id``). An entry is written ``pending``
before an alias move and marked ``committed`` after it; a pending entry left by a kill is settled
on the next write (committed if ``champion`` names its version, aborted otherwise) and read the
same way. Entries that older versions kept as registered-model tags are still read.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
from tasks.registry.base import (
    _HISTORY_DIR,
    _HISTORY_PREFIX,
    _TAG_HISTORY_RUN,
    CHAMPION,
    Action,
    EntryState,
    _client,
    _is_missing,
    _now,
    get_alias_version,
)


@dataclass(frozen=True)
class HistoryEntry:
    """One change of the ``champion`` alias.

    Attributes:
        seq: Position in the history (0, 1, ...).
        version: Version that became champion.
        action: ``promote`` (gate), ``manual`` (forced promotion) or ``rollback``.
        at: UTC time of the change (ISO 8601).
        reason: Why (the gate's reason, or the operator's).
        previous_version: Champion it replaced (None for the first one).
        run_id: MLflow run that produced ``version`` (None for rollbacks).
        state: ``committed``; or ``aborted``/``pending`` in ``include_aborted`` listings.
        replaced_by: Version that replaced it next (None while it is champion).
        replaced_at: When that happened.
    """

    seq: int
    version: str
    action: Action
    at: str
    reason: str
    previous_version: str | None = None
    run_id: str | None = None
    state: EntryState = "committed"
    replaced_by: str | None = None
    replaced_at: str | None = None


def _history_run(client: MlflowClient, model_name: str, create: bool) -> str | None:
    """The MLflow run whose artifacts hold ``model_name``'s champion history."""
    run_id = client.get_registered_model(model_name).tags.get(_TAG_HISTORY_RUN)
    if run_id or not create:
        return run_id or None
    from mlflow.tracking.fluent import _get_experiment_id
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    run = client.create_run(
        _get_experiment_id() or "0",
        run_name=f"champion-history-{model_name}",
        tags={"cubeline.flow": "champion-history", "cubeline.model_name": model_name,
              MLFLOW_RUN_NOTE: "Who held alias champion of "
              f"{model_name}, when and why: one JSON file per change (cubeline history)."},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_registered_model_tag(model_name, _TAG_HISTORY_RUN, run.info.run_id)
    return str(run.info.run_id)


def _raw_history(client: MlflowClient, model_name: str) -> list[dict[str, Any]]:
    import tempfile
    from pathlib import Path

    import mlflow

    tags = client.get_registered_model(model_name).tags
    by_seq = {
        int(e["seq"]): e
        for e in (json.loads(v) for k, v in tags.items() if k.startswith(_HISTORY_PREFIX))
    }
    run_id = _history_run(client, model_name, create=False)
    if run_id and client.list_artifacts(run_id, _HISTORY_DIR):
        with tempfile.TemporaryDirectory(prefix="cubeline-history-") as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=_HISTORY_DIR, dst_path=tmp
                )
            )
            for path in local.glob("*.json"):
                entry = json.loads(path.read_text(encoding="utf-8"))
                by_seq[int(entry["seq"])] = entry
    return [by_seq[k] for k in sorted(by_seq)]


def _write_entry(client: MlflowClient, model_name: str, entry: dict[str, Any]) -> None:
    import tempfile
    from pathlib import Path

    run_id = _history_run(client, model_name, create=True)
    assert run_id is not None
    with tempfile.TemporaryDirectory(prefix="cubeline-history-") as tmp:
        path = Path(tmp) / f"{int(entry['seq']):06d}.json"
        path.write_text(json.dumps(entry, sort_keys=True, indent=1), encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=_HISTORY_DIR)


def _settled(entries: list[dict[str, Any]], champion: str | None) -> list[dict[str, Any]]:
    """Resolve pending entries as the registry state says (see module docstring)."""
    out = []
    for e in entries:
        if e["state"] == "pending":
            e = {**e, "state": "committed" if e["version"] == champion else "aborted"}
        out.append(e)
    return out


def _settle_pending(client: MlflowClient, model_name: str) -> list[dict[str, Any]]:
    champion = get_alias_version(model_name, CHAMPION)
    raw = _raw_history(client, model_name)
    settled = _settled(raw, str(champion.version) if champion else None)
    for before, after in zip(raw, settled, strict=True):
        if before["state"] != after["state"]:
            _write_entry(client, model_name, {**after, "settled_at": _now()})
    return settled


def _champion_stack(entries: list[dict[str, Any]]) -> list[str]:
    """Versions that held ``champion``, innermost last: rollback pops, promotions push."""
    stack: list[str] = []
    for e in entries:
        if e["state"] != "committed":
            continue
        if e["action"] == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != e["version"]:
                stack.append(e["version"])
        else:
            stack.append(e["version"])
    return stack


def champion_history(model_name: str, include_aborted: bool = False) -> list[HistoryEntry]:
    """Return who held ``champion``, when and why, oldest first.

    Args:
        model_name: Registered model.
        include_aborted: Also list changes that were rolled back or interrupted.

    Returns:
        The entries (empty if the model or its history does not exist).
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        raw = _raw_history(client, model_name)
    except MlflowException as exc:
        if _is_missing(exc):
            return []
        raise
    champion = get_alias_version(model_name, CHAMPION)
    settled = _settled(raw, str(champion.version) if champion else None)
    committed = [e for e in settled if e["state"] == "committed"]
    successor = {a["seq"]: b for a, b in itertools.pairwise(committed)}
    out = []
    for e in settled:
        if e["state"] != "committed" and not include_aborted:
            continue
        nxt = successor.get(e["seq"])
        out.append(
            HistoryEntry(
                seq=int(e["seq"]),
                version=str(e["version"]),
                action=e["action"],
                at=e["at"],
                reason=e["reason"],
                previous_version=e.get("previous_version"),
                run_id=e.get("run_id"),
                state=e["state"],
                replaced_by=nxt["version"] if nxt else None,
                replaced_at=nxt["at"] if nxt else None,
            )
        )
    return out
