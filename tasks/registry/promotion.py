"""The registry's public operations: register and promote behind the gate, promote, roll back.

Moving an alias is one ``set_registered_model_alias`` call, a single row upsert in the registry
database: at every instant ``champion`` names the old or the new version, never none. The moves
run inside a Prefect transaction whose rollback hooks put the previous aliases back, under the
registry lock (:mod:`tasks.registry.lock`), so concurrent registrations serialize.

Why one module of about 400 lines: the public operations share one lock-decide-move sequence
(and its rollback hooks); the pure gate is :mod:`tasks.registry.gate`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
from tasks.registry.base import (
    _METRIC_TAG_PREFIX,
    _TAG_CONTEXT,
    _TAG_DECISION,
    _TAG_DECISION_REASON,
    _TAG_EVAL_PREFIX,
    _TAG_REGISTERED_AT,
    _TAG_RUN,
    _TAG_SPLIT,
    CHALLENGER,
    CHAMPION,
    TAG_FINGERPRINT,
    Action,
    RegistrationResult,
    RegistryError,
    _client,
    _ensure_registered_model,
    _fault,
    _metrics_json,
    _now,
    find_versions_by_tag,
    get_alias_version,
    version_metrics,
)
from tasks.registry.gate import GateLike, PromotionDecision, as_gate, decide_promotion
from tasks.registry.history import HistoryEntry, _champion_stack, _settle_pending, _write_entry
from tasks.registry.lock import _registry_lock

log = logging.getLogger(__name__)


def _champion_view(
    champion: ModelVersion | None, split_id: str
) -> tuple[dict[str, float] | None, str | None]:
    """Champion's metrics and split id as the gate needs them (its own split if not scored)."""
    if champion is None:
        return None, None
    on_split = version_metrics(champion, split_id)
    if on_split is not None:
        return on_split, split_id
    own_split = champion.tags.get(_TAG_SPLIT)
    own = version_metrics(champion, own_split) if own_split else None
    return (own or {}), own_split


def _move_alias(
    client: MlflowClient,
    txn: Any,
    model_name: str,
    alias: str,
    version: str,
    previous: str | None,
    on_undo: Callable[[], None] | None = None,
) -> None:
    """Point ``alias`` at ``version`` in one write, with a rollback hook restoring ``previous``."""

    def restore_alias(_txn: Any) -> None:
        with _registry_lock(timeout_s=600.0):
            current = get_alias_version(model_name, alias)
            # Only undo our own move: a later registration may have moved the alias since.
            if current is not None and str(current.version) == version:
                if previous is None:
                    client.delete_registered_model_alias(model_name, alias)
                else:
                    client.set_registered_model_alias(model_name, alias, previous)
            if on_undo is not None:
                on_undo()

    restore_alias.__name__ = f"restore_{alias}_alias"
    # Registered before the move, so the hook covers a failure of the move itself as well.
    txn.on_rollback_hooks.append(restore_alias)
    client.set_registered_model_alias(model_name, alias, version)


def _change_champion(
    client: MlflowClient,
    txn: Any,
    model_name: str,
    version: str,
    previous: str | None,
    action: Action,
    reason: str,
    run_id: str | None,
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    seq = int(entries[-1]["seq"]) + 1 if entries else 0
    entry: dict[str, Any] = {
        "seq": seq,
        "version": version,
        "action": action,
        "at": _now(),
        "reason": reason,
        "previous_version": previous,
        "run_id": run_id,
        "state": "pending",
    }
    _write_entry(client, model_name, entry)
    _fault("before_champion_alias")

    def mark_aborted() -> None:
        _write_entry(client, model_name, {**entry, "state": "aborted", "settled_at": _now()})
        if action == "promote":
            client.set_model_version_tag(model_name, version, _TAG_DECISION, "rolled_back")

    _move_alias(client, txn, model_name, CHAMPION, version, previous, on_undo=mark_aborted)
    _fault("after_champion_alias")
    entry = {**entry, "state": "committed"}
    _write_entry(client, model_name, entry)
    return entry


def register_and_promote(
    run_id: str,
    model_uri: str,
    metrics: Mapping[str, float],
    split_id: str,
    gate: GateLike,
    model_name: str,
    reason_context: str = "",
    *,
    reevaluate_champion: Callable[[ModelVersion, str], Mapping[str, float]] | None = None,
    lock_timeout_s: float = 600.0,
    tags: Mapping[str, str] | None = None,
    description: str = "",
) -> RegistrationResult:
    """Register a new model version, make it ``challenger``, and ``champion`` if the gate agrees.

    Args:
        run_id: MLflow run that produced the model.
        model_uri: The logged model (``models:/<model_id>`` from ``log_pipeline_model``).
        metrics: Its test metrics on ``split_id``.
        split_id: Pinned evaluation split (:func:`split_id_of`).
        gate: Promotion gate (a :class:`GateConfig`, or the ``params.yaml`` section).
        model_name: Registered model name (``params.yaml``).
        reason_context: Why this run happened (flow, trigger), kept with the version and the
            history.
        reevaluate_champion: Called as ``f(champion_version, split_id) -> metrics`` when the
            champion has no score on ``split_id``; its result is stored on the champion version
            and the gate decides again. Without it such a challenger stays challenger.
        lock_timeout_s: How long to wait for a concurrent registration.
        tags: More tags for the new version (e.g. :data:`TAG_FINGERPRINT`).
        description: One line on why the version exists (the registry page shows it).

    Returns:
        The new version, the decision and the aliases after the call.

    Raises:
        RegistryError: The registry lock could not be taken.
        ConfigError: The metrics lack the gate's metric.
    """
    import mlflow
    from prefect.transactions import transaction

    client = _client()
    gate = as_gate(gate)
    metrics = {k: float(v) for k, v in metrics.items()}
    with _registry_lock(lock_timeout_s):
        _ensure_registered_model(client, model_name)
        fp = (tags or {}).get(TAG_FINGERPRINT)
        same = find_versions_by_tag(model_name, TAG_FINGERPRINT, fp) if fp else []
        if same:
            # Checked again under the lock: a concurrent run may have registered it meanwhile.
            champ = get_alias_version(model_name, CHAMPION)
            holder = str(champ.version) if champ is not None else None
            return RegistrationResult(
                model_name=model_name,
                version=same[0],
                decision=PromotionDecision(
                    promote=False,
                    reason=f"unchanged: version {same[0]} holds this exact model (same data, "
                    "params, Phase-1 state and code); nothing registered",
                    metric=gate.metric,
                    challenger_value=float(metrics.get(gate.metric, math.nan)),
                ),
                champion_version=holder,
                previous_champion_version=holder,
                unchanged=True,
            )
        entries = _settle_pending(client, model_name)
        version_tags = {
            _TAG_RUN: run_id,
            _TAG_SPLIT: split_id,
            f"{_TAG_EVAL_PREFIX}{split_id}": _metrics_json(metrics),
            _TAG_REGISTERED_AT: _now(),
            **{f"{_METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items()},
        }
        if reason_context:
            version_tags[_TAG_CONTEXT] = reason_context[:5000]
        version_tags.update(tags or {})
        # register_model prints its progress on stderr ("Created version ..."): the summary
        # says it, so keep it for -v (DEBUG) only.
        chatter = io.StringIO()
        with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
            mv = mlflow.register_model(model_uri, model_name, tags=version_tags)
        log.debug("%s", chatter.getvalue().strip())
        version = str(mv.version)
        if description:
            client.update_model_version(model_name, version, description=description[:5000])
        _fault("after_create_version")

        champion = get_alias_version(model_name, CHAMPION)
        challenger_before = get_alias_version(model_name, CHALLENGER)
        previous_champion = str(champion.version) if champion is not None else None
        champion_metrics, champion_split = _champion_view(champion, split_id)
        decision = decide_promotion(
            metrics,
            champion_metrics,
            gate,
            challenger_split_id=split_id,
            champion_split_id=champion_split,
        )
        reevaluated = False
        if (
            champion is not None
            and decision.needs_champion_reevaluation
            and reevaluate_champion is not None
        ):
            fresh = {k: float(v) for k, v in reevaluate_champion(champion, split_id).items()}
            client.set_model_version_tag(
                model_name, champion.version, f"{_TAG_EVAL_PREFIX}{split_id}", _metrics_json(fresh)
            )
            reevaluated = True
            decision = decide_promotion(
                metrics, fresh, gate, challenger_split_id=split_id, champion_split_id=split_id
            )

        _fault("after_decision")
        with transaction() as txn:
            _move_alias(
                client,
                txn,
                model_name,
                CHALLENGER,
                version,
                str(challenger_before.version) if challenger_before is not None else None,
            )
            _fault("after_challenger_alias")
            if decision.promote:
                reason = decision.reason + (f" [{reason_context}]" if reason_context else "")
                _change_champion(
                    client,
                    txn,
                    model_name,
                    version,
                    previous_champion,
                    "promote",
                    reason,
                    run_id,
                    entries,
                )
        client.set_model_version_tag(
            model_name, version, _TAG_DECISION, CHAMPION if decision.promote else CHALLENGER
        )
        client.set_model_version_tag(
            model_name, version, _TAG_DECISION_REASON, decision.reason[:5000]
        )
        _fault("before_lock_release")
        after = get_alias_version(model_name, CHAMPION)
    return RegistrationResult(
        model_name=model_name,
        version=version,
        decision=decision,
        champion_version=str(after.version) if after is not None else None,
        previous_champion_version=previous_champion,
        champion_reevaluated=reevaluated,
    )


def promote_version(
    model_name: str,
    version: str | int,
    reason: str,
    gate: GateLike | None = None,
    *,
    lock_timeout_s: float = 600.0,
) -> PromotionDecision:
    """Move ``champion`` to a given version (``cubeline promote``), recorded in the history.

    With a gate, the version's stored metrics on its own split are compared with the champion's
    on that split and nothing moves unless the gate agrees. Without one the move is forced.

    Args:
        model_name: Registered model.
        version: Version to promote.
        reason: Why (kept in the history).
        gate: Optional gate to apply.
        lock_timeout_s: How long to wait for a concurrent registration.

    Returns:
        The decision (forced moves report ``promote=True`` with the operator's reason).

    Raises:
        RegistryError: The version does not exist, or has no stored metrics for a gated move.
    """
    from mlflow.exceptions import MlflowException
    from prefect.transactions import transaction

    client = _client()
    version = str(version)
    gate = None if gate is None else as_gate(gate)
    with _registry_lock(lock_timeout_s):
        try:
            mv = client.get_model_version(model_name, version)
        except MlflowException as exc:
            raise RegistryError(
                f"Model {model_name!r} has no version {version}: {exc}. Fix: list versions in "
                "the MLflow UI or with `mlflow.search_model_versions`."
            ) from exc
        entries = _settle_pending(client, model_name)
        champion = get_alias_version(model_name, CHAMPION)
        previous = str(champion.version) if champion is not None else None
        if previous == version:
            return PromotionDecision(
                promote=False,
                reason=f"version {version} already is champion",
                metric=gate.metric if gate else "",
                challenger_value=math.nan,
            )
        if gate is None:
            decision = PromotionDecision(
                promote=True, reason=f"manual promotion: {reason}", metric="", challenger_value=0.0
            )
        else:
            split = mv.tags.get(_TAG_SPLIT) or ""
            mine = version_metrics(mv, split)
            if mine is None:
                raise RegistryError(
                    f"Version {version} of {model_name!r} has no stored metrics, so the gate "
                    "cannot judge it. Fix: promote without a gate (forced) or re-register it."
                )
            theirs, their_split = _champion_view(champion, split)
            decision = decide_promotion(
                mine, theirs, gate, challenger_split_id=split, champion_split_id=their_split
            )
        if not decision.promote:
            return decision
        with transaction() as txn:
            _change_champion(
                client,
                txn,
                model_name,
                version,
                previous,
                "manual",
                f"{reason} ({decision.reason})" if gate else reason,
                mv.tags.get(_TAG_RUN) or mv.run_id,
                entries,
            )
    return decision


def rollback(model_name: str, reason: str, *, lock_timeout_s: float = 600.0) -> HistoryEntry:
    """Move ``champion`` back to the champion before the current one, and record it.

    Successive rollbacks walk further back (the history is a stack: promotions push, rollbacks
    pop).

    Args:
        model_name: Registered model.
        reason: Why (kept in the history).
        lock_timeout_s: How long to wait for a concurrent registration.

    Returns:
        The history entry of the rollback.

    Raises:
        RegistryError: No champion, no previous champion (or it was deleted), or ``champion``
            was moved outside cubeline so the history does not say what "previous" is.
    """
    from mlflow.exceptions import MlflowException
    from prefect.transactions import transaction

    client = _client()
    with _registry_lock(lock_timeout_s):
        champion = get_alias_version(model_name, CHAMPION)
        if champion is None:
            raise RegistryError(
                f"Model {model_name!r} has no champion to roll back. Fix: register and promote a "
                "model first (`cubeline run`)."
            )
        entries = _settle_pending(client, model_name)
        stack = _champion_stack(entries)
        current = str(champion.version)
        if not stack or stack[-1] != current:
            raise RegistryError(
                f"Alias champion of {model_name!r} names version {current}, but cubeline's "
                f"history ends with {stack[-1] if stack else 'nothing'}: the alias was moved "
                "outside cubeline. Fix: choose the version yourself with `cubeline promote "
                "--version N`."
            )
        if len(stack) < 2:
            raise RegistryError(
                f"Version {current} of {model_name!r} is the first champion in the history; "
                "there is no previous champion to roll back to."
            )
        target = stack[-2]
        try:
            client.get_model_version(model_name, target)
        except MlflowException as exc:
            raise RegistryError(
                f"The previous champion of {model_name!r}, version {target}, no longer exists "
                f"({exc}). Fix: choose a version with `cubeline promote --version N`."
            ) from exc
        with transaction() as txn:
            entry = _change_champion(
                client, txn, model_name, target, current, "rollback", reason, None, entries
            )
    return HistoryEntry(
        seq=int(entry["seq"]),
        version=target,
        action="rollback",
        at=entry["at"],
        reason=reason,
        previous_version=current,
    )
