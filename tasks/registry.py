"""Model-registry promotion behind a metric gate, with aliases, durable history and rollback.

The decision and the side effects are kept apart (DESIGN.md §4.6):

- :func:`decide_promotion` is a pure function of the challenger's and champion's metrics on the
  *same* pinned evaluation split and a :class:`GateConfig`: better by the margin → promote; worse
  or equal → stay challenger; no champion → the absolute thresholds alone (which always apply).
- :func:`register_and_promote` creates the model version, moves alias ``challenger`` and, if the
  decision says so, alias ``champion``. MLflow's deprecated stages are not used.

Crash and concurrency safety (why the code is ordered as it is):

- Moving an alias is one ``set_registered_model_alias`` call, a single row upsert in the
  registry database: at every instant ``champion`` names the old or the new version, never none.
  It is never deleted and set again.
- The alias moves run inside a Prefect transaction whose rollback hooks put the previous
  ``champion``/``challenger`` back (only if the alias still names our version), so an exception
  after the move leaves the old champion in place. Called inside a Prefect task, the transaction
  nests in the task's own: if the task fails after registering, the moves are undone too (the
  new version stays registered; its ``cubeline.decision`` tag says ``rolled_back``). A SIGKILL
  cannot run hooks; it leaves the old or the new champion, both valid states.
- The whole read → decide → write sequence holds an exclusive lock (:func:`_registry_lock`).
  Two concurrent registrations therefore serialize: the second one is compared with the first
  one's result, and the history stays a single line. With ``$CUBELINE_REGISTRY_LOCK_URI`` (the
  team stack's ``stack.env``) or a ``postgresql`` registry, it is PostgreSQL's session advisory
  lock on that database: held by the database server, so it spans machines (users' clones,
  workers), and dropped when its holder dies or its connection breaks. Otherwise it is a file
  lock keyed on the registry URI (:func:`tasks.tracking.uri_lock`: ``fcntl`` through
  ``filelock``; the kernel drops it when a process dies), which is host-local: fine for the
  embedded SQLite store. Either way a kill leaves no stale lock. A ``reevaluate_champion``
  hook runs under the lock, so a concurrent registration waits for it.

Champion history is kept in its own store beside the registry: the artifacts
``champion_history/<seq>.json`` of one MLflow run per registered model (run name
``champion-history-<model>``, found through the short registered-model tag
``cubeline.history_run_id``), one small JSON file per change (append-only, no read-modify-write
of a growing list, no long JSON in tags). An entry is written as ``pending`` before the alias move
and marked ``committed`` after it; a pending entry left by a kill is settled on the next write
(committed if ``champion`` names its version, aborted otherwise) and read the same way. Entries
that older cubeline versions kept as registered-model tags ``cubeline.champion_history.<seq>``
are still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodes.errors import ConfigError, CubelineError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "FAULT_ENV",
    "GateConfig",
    "HistoryEntry",
    "InjectedFaultError",
    "PromotionDecision",
    "RegistrationResult",
    "RegistryError",
    "as_gate",
    "champion_history",
    "decide_promotion",
    "get_alias_version",
    "promote_version",
    "register_and_promote",
    "rollback",
    "split_id_of",
    "version_metrics",
]

CHAMPION = "champion"
CHALLENGER = "challenger"

#: Test hook: ``<point>:kill`` SIGKILLs this process at that point of a registry write,
#: ``<point>:raise`` raises :class:`InjectedFaultError`, ``<point>:sleep<seconds>`` pauses there.
#: Points, in order: ``after_create_version``, ``after_decision``, ``after_challenger_alias``,
#: ``before_champion_alias``, ``after_champion_alias``, ``before_lock_release``. Unset in normal
#: use.
FAULT_ENV = "CUBELINE_REGISTRY_FAULT"

_HISTORY_PREFIX = "cubeline.champion_history."  # where cubeline <= 0.x kept it (read only)
_TAG_HISTORY_RUN = "cubeline.history_run_id"
_HISTORY_DIR = "champion_history"
_TAG_SPLIT = "cubeline.split_id"
_TAG_EVAL_PREFIX = "cubeline.eval."
_TAG_RUN = "cubeline.run_id"
_TAG_CONTEXT = "cubeline.reason_context"
#: What fixes a trained model (data, split, params, Phase-1 state, code): see tasks.steps.
TAG_FINGERPRINT = "cubeline.fingerprint"
#: Key under which the calibrated decision threshold reaches the gate (not a gate metric).
THRESHOLD_METRIC = "decision_threshold_logit"
#: ``<prefix><artifact>`` = SHA-256 of the model's pipeline YAML / weights, pinned at registration.
TAG_SHA256_PREFIX = "cubeline.sha256."
_TAG_REGISTERED_AT = "cubeline.registered_at"
_TAG_DECISION = "cubeline.decision"
_TAG_DECISION_REASON = "cubeline.decision_reason"
_METRIC_TAG_PREFIX = "metric."
#: Relative tolerance when comparing an improvement with the margin: 0.83 - 0.82 is
#: 0.00999999... in binary floating point and must still count as a margin of 0.01.
_MARGIN_RTOL = 1e-9

Action = Literal["promote", "rollback", "manual"]
EntryState = Literal["pending", "committed", "aborted"]


class RegistryError(CubelineError):
    """A registry operation cannot be done (no previous champion, unknown version, lock held)."""


class InjectedFaultError(RuntimeError):
    """Raised at a fault point named in ``$CUBELINE_REGISTRY_FAULT`` (tests only)."""


def _fault(point: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("sleep"):
        time.sleep(float(action[len("sleep") :]))
        return
    raise InjectedFaultError(f"fault injected at {point!r} by ${FAULT_ENV}")


# --------------------------------------------------------------------------------------------
# The gate (pure)
# --------------------------------------------------------------------------------------------


class GateConfig(BaseModel):
    """Promotion gate: which metric decides, in which direction, by what margin.

    Attributes:
        metric: Metric that decides, as logged by the evaluation (e.g. ``metrics_anomaly/ap``).
        mode: ``max`` if higher is better, ``min`` if lower is better.
        min_improvement: Margin the challenger must beat the champion by (in metric units,
            inclusive). Equal is never enough, even at 0.
        absolute_thresholds: Minimums (``metric >= value``) the challenger must meet. They
            always apply: alone for the first model, and on top of the margin afterwards.
        absolute_maximums: Maximums (``metric <= value``), for lower-is-better metrics such as
            a loss; always apply too.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = "metrics_anomaly/ap"
    mode: Literal["max", "min"] = "max"
    min_improvement: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    absolute_thresholds: dict[str, float] = Field(default_factory=dict)
    absolute_maximums: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "params.yaml") -> GateConfig:
        """Validate a params section into a gate, as a :class:`ConfigError` naming ``source``.

        Args:
            data: The section, e.g. ``params["register"]["gate"]``.
            source: Where it came from, for the error message.

        Returns:
            The gate.

        Raises:
            ConfigError: Unknown key, wrong type, negative margin.
        """
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<section>'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(
                f"{source}: invalid promotion gate ({problems}). Fix: use the keys metric, mode "
                "(max|min), min_improvement (>= 0), absolute_thresholds, absolute_maximums."
            ) from exc


GateLike = GateConfig | BaseModel | Mapping[str, Any]


def as_gate(gate: GateLike, source: str = "params.yaml:registry.gate") -> GateConfig:
    """Coerce a gate given as :class:`GateConfig`, another pydantic model or a mapping.

    Lets callers pass the typed ``params.yaml`` section as it is.

    Raises:
        ConfigError: The fields do not make a valid gate.
    """
    if isinstance(gate, GateConfig):
        return gate
    data = gate.model_dump() if isinstance(gate, BaseModel) else dict(gate)
    return GateConfig.from_mapping(data, source=source)


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`decide_promotion`.

    Attributes:
        promote: Move ``champion`` to the challenger.
        reason: One sentence saying why, with the numbers.
        metric: The deciding metric.
        challenger_value: Challenger's value of ``metric``.
        champion_value: Champion's value on the same split (None: no champion or not comparable).
        improvement: Signed improvement in the better direction (None when not compared).
        comparable: False when the champion's metrics are not on the challenger's split (or lack
            the metric): the champion must be re-evaluated before a comparison.
        failed_thresholds: Absolute thresholds the challenger missed, as readable strings.
    """

    promote: bool
    reason: str
    metric: str
    challenger_value: float
    champion_value: float | None = None
    improvement: float | None = None
    comparable: bool = True
    failed_thresholds: tuple[str, ...] = ()

    @property
    def needs_champion_reevaluation(self) -> bool:
        """The challenger passed its thresholds but the champion has no score on its split."""
        return not self.comparable and not self.failed_thresholds


def _metric(metrics: Mapping[str, float], name: str, who: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"Promotion gate: the {who} has no metric {name!r} (it has "
            f"{sorted(metrics)}). Fix: set the gate's metric/thresholds in params.yaml to a "
            "metric the evaluation logs."
        )
    return float(metrics[name])


def decide_promotion(
    challenger_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    gate: GateLike,
    *,
    challenger_split_id: str,
    champion_split_id: str | None = None,
) -> PromotionDecision:
    """Decide whether the challenger replaces the champion. Pure: no I/O.

    Rules, in order: the challenger must meet every absolute threshold (always); with no champion
    that is enough; otherwise both must have been evaluated on the same split (else not
    comparable: no promotion, re-evaluate the champion); then the challenger must be strictly
    better and better by at least ``gate.min_improvement``. A NaN never promotes.

    Args:
        challenger_metrics: Challenger's test metrics.
        champion_metrics: Champion's metrics on ``champion_split_id``; None if no champion.
        gate: The gate.
        challenger_split_id: Id of the evaluation split the challenger was scored on.
        champion_split_id: Id of the split the champion's metrics come from.

    Returns:
        The decision with its reason.

    Raises:
        ConfigError: The challenger lacks the gate metric or a thresholded metric.
    """
    gate = as_gate(gate)
    name = gate.metric
    value = _metric(challenger_metrics, name, "challenger")
    failed: list[str] = []
    for key, minimum in sorted(gate.absolute_thresholds.items()):
        got = _metric(challenger_metrics, key, "challenger")
        if not got >= minimum:  # NaN fails too
            failed.append(f"{key}={got:.6g} < minimum {minimum:.6g}")
    for key, maximum in sorted(gate.absolute_maximums.items()):
        got = _metric(challenger_metrics, key, "challenger")
        if not got <= maximum:
            failed.append(f"{key}={got:.6g} > maximum {maximum:.6g}")
    if math.isnan(value):
        failed.append(f"{name} is NaN")
    # Floors no params.yaml can lower: a detector no better than chance, or one whose decision
    # threshold is not a number, is never promoted.
    for key, got in sorted(challenger_metrics.items()):
        if key.rsplit("/", 1)[-1] == "auroc" and not float(got) > 0.5:
            failed.append(f"{key}={float(got):.6g} <= 0.5 (no better than chance; never promoted)")
    threshold = challenger_metrics.get(THRESHOLD_METRIC)
    if threshold is not None and not math.isfinite(float(threshold)):
        failed.append(f"decision threshold {threshold} is not finite (never promoted)")
    if failed:
        return PromotionDecision(
            promote=False,
            reason="challenger fails the absolute thresholds: " + "; ".join(failed),
            metric=name,
            challenger_value=value,
            failed_thresholds=tuple(failed),
        )
    if champion_metrics is None:
        return PromotionDecision(
            promote=True,
            reason=(
                f"no champion yet; challenger meets the absolute thresholds ({name}={value:.6g})"
            ),
            metric=name,
            challenger_value=value,
        )
    if champion_split_id != challenger_split_id:
        return PromotionDecision(
            promote=False,
            reason=(
                f"not comparable: champion scored on split {champion_split_id!r}, challenger on "
                f"{challenger_split_id!r}; re-evaluate the champion on the challenger's split"
            ),
            metric=name,
            challenger_value=value,
            comparable=False,
        )
    champ = float(champion_metrics[name]) if name in champion_metrics else math.nan
    if math.isnan(champ):
        return PromotionDecision(
            promote=False,
            reason=(
                f"not comparable: the champion has no finite {name!r} on split "
                f"{challenger_split_id!r}; re-evaluate the champion"
            ),
            metric=name,
            challenger_value=value,
            comparable=False,
        )
    improvement = value - champ if gate.mode == "max" else champ - value
    margin = gate.min_improvement
    better = improvement > 0 and improvement >= margin - _MARGIN_RTOL * max(1.0, abs(margin))
    direction = "higher" if gate.mode == "max" else "lower"
    if better:
        reason = (
            f"challenger beats champion on {name} ({direction} is better): {value:.6g} vs "
            f"{champ:.6g}, improvement {improvement:.6g} >= margin {margin:.6g}"
        )
    elif improvement == 0:
        reason = f"challenger equals champion on {name} ({value:.6g}); equal does not promote"
    elif improvement < 0:
        reason = (
            f"challenger is worse than champion on {name} ({direction} is better): "
            f"{value:.6g} vs {champ:.6g}"
        )
    else:
        reason = (
            f"challenger improves {name} by {improvement:.6g} ({value:.6g} vs {champ:.6g}), "
            f"below the margin {margin:.6g}"
        )
    return PromotionDecision(
        promote=better,
        reason=reason,
        metric=name,
        challenger_value=value,
        champion_value=champ,
        improvement=improvement,
    )


def split_id_of(frame_ids: list[str] | tuple[str, ...], data_hash: str) -> str:
    """Return the id of a pinned evaluation split: SHA-256 of its data hash and frame ids.

    Args:
        frame_ids: Test frame ids, in any order (they are sorted).
        data_hash: DVC content hash of the data the frames come from.

    Returns:
        16 hex digits (enough to tell splits apart; short enough for a tag key).
    """
    payload = json.dumps({"data": data_hash, "frames": sorted(map(str, frame_ids))})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Registry plumbing
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class RegistrationResult:
    """What :func:`register_and_promote` did.

    Attributes:
        model_name: Registered model.
        version: The new version (now ``challenger``).
        decision: The gate's decision.
        champion_version: ``champion`` after the call (None if there is none).
        previous_champion_version: ``champion`` before the call.
        champion_reevaluated: The champion was re-scored on the challenger's split.
        unchanged: ``version`` already held this exact model (same :data:`TAG_FINGERPRINT`,
            registered by a concurrent run while this one trained): nothing was registered.
    """

    model_name: str
    version: str
    decision: PromotionDecision
    champion_version: str | None
    previous_champion_version: str | None
    champion_reevaluated: bool = False
    unchanged: bool = False

    @property
    def alias(self) -> str:
        """The strongest alias the new version holds."""
        return CHAMPION if self.champion_version == self.version else CHALLENGER

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for summaries and Prefect results)."""
        out = asdict(self)
        out["alias"] = self.alias
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _client() -> MlflowClient:
    import mlflow

    return mlflow.MlflowClient()


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def find_versions_by_tag(model_name: str, key: str, value: str) -> list[str]:
    """Versions of ``model_name`` whose tag ``key`` equals ``value``, newest first."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        found = client.search_model_versions(
            f"name = '{model_name}' and tags.`{key}` = '{value}'"
        )
    except MlflowException as exc:
        if _is_missing(exc):
            return []
        raise
    return sorted((str(mv.version) for mv in found), key=int, reverse=True)


def get_alias_version(model_name: str, alias: str) -> ModelVersion | None:
    """Return the version that ``alias`` names, or None (no such alias or model).

    Args:
        model_name: Registered model.
        alias: E.g. ``champion``.

    Returns:
        The model version, or None.
    """
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise


#: PostgreSQL URL of the registry's cross-machine lock (``cubeline stack up`` exports it).
LOCK_ENV = "CUBELINE_REGISTRY_LOCK_URI"
#: The advisory-lock key: one per database (one registry per team stack), the same for every
#: client whatever host name it uses to reach the server.
_ADVISORY_KEY = int.from_bytes(
    hashlib.sha256(b"cubeline.registry").digest()[:8], "big", signed=True
)
_held = threading.local()
_warned_host_local = False


def _lock_database() -> str | None:
    """The PostgreSQL database whose advisory lock serializes registry moves, if any.

    ``$CUBELINE_REGISTRY_LOCK_URI`` wins (the clients of a tracking *server* reach its database
    only through it); else the registry URI itself when it is a ``postgresql`` store.
    """
    import mlflow

    env = os.environ.get(LOCK_ENV)
    if env:
        return env
    uri = mlflow.get_registry_uri() or ""
    if uri.startswith("postgresql"):
        return uri
    return None


def _redact(url: str) -> str:
    """``url`` without its password (for messages)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _try_lock(conn: Any) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_ADVISORY_KEY,)).fetchone()
    return bool(row and row[0])


@contextlib.contextmanager
def _advisory_lock(url: str, timeout_s: float) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock ``_ADVISORY_KEY`` on the database at ``url``.

    The lock lives in the database server, so it excludes registrations on every machine; it is
    bound to this connection, so the server drops it when the holder dies or its connection
    breaks (a killed run leaves no stale lock). Re-entrant within a thread, like the file lock:
    a rollback hook may take the lock its registration holds.
    """
    held: dict[str, Any] = getattr(_held, "locks", None) or {}
    _held.locks = held
    if url in held:
        held[url][1] += 1
        try:
            yield
        finally:
            held[url][1] -= 1
        return
    import psycopg

    # libpq's form: the SQLAlchemy driver suffix (postgresql+psycopg://) is not a URL scheme.
    dsn = "postgresql://" + url.split("://", 1)[1] if url.startswith("postgresql+") else url
    try:
        conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, keepalives=1, keepalives_idle=30,
            application_name=f"cubeline registry lock pid {os.getpid()}",
        )
    except psycopg.Error as exc:
        raise RegistryError(
            f"The registry lock database {_redact(url)} (${LOCK_ENV}) does not answer: "
            f"{str(exc).strip()}. Fix: start the team stack (`cubeline stack up`, then export "
            "its stack.env), or unset the variable to use the host-local file lock."
        ) from exc
    try:
        deadline = time.monotonic() + timeout_s
        wait = 0.05
        while not _try_lock(conn):
            if time.monotonic() >= deadline:
                row = conn.execute(
                    "SELECT a.application_name, a.client_addr FROM pg_locks l JOIN "
                    "pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND "
                    "l.granted AND a.pid <> pg_backend_pid() LIMIT 1"
                ).fetchone()
                holder = f"{row[0]} from {row[1] or 'this host'}" if row else "another client"
                raise RegistryError(
                    f"Another registration ({holder}) has held the registry lock (PostgreSQL "
                    f"advisory lock on {_redact(url)}) for over {timeout_s:.0f} s. Fix: wait "
                    "for the other cubeline run to finish; the lock frees itself when that "
                    "process exits or its connection drops."
                )
            time.sleep(wait)
            wait = min(wait * 2, 1.0)
        held[url] = [conn, 1]
        try:
            yield
        finally:
            del held[url]
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_KEY,))
    finally:
        conn.close()


@contextlib.contextmanager
def _registry_lock(timeout_s: float) -> Iterator[None]:
    """Serialize the registry's read -> decide -> write sequences.

    Across machines where the services give a lock: PostgreSQL's advisory lock on the database
    of :func:`_lock_database` (the team stack's). Otherwise an ``fcntl`` file lock keyed on the
    registry URI, which spans the processes of one host only (the embedded SQLite default).
    """
    import mlflow

    from tasks.tracking import LockTimeoutError, uri_lock

    database = _lock_database()
    if database is not None:
        with _advisory_lock(database, timeout_s):
            yield
        return
    uri = mlflow.get_registry_uri()
    global _warned_host_local
    if uri.startswith(("http://", "https://")) and not _warned_host_local:
        _warned_host_local = True
        log.warning(
            "Registry %s is remote but $%s is unset: registrations are serialized on this host "
            "only. Set it to the PostgreSQL database of the tracking server (cubeline stack "
            "up's stack.env does) to serialize them across machines.", uri, LOCK_ENV,
        )
    try:
        with uri_lock(uri, "registry", timeout_s):
            yield
    except LockTimeoutError as exc:
        raise RegistryError(
            f"Another registration has held the registry lock {exc.path} for over "
            f"{timeout_s:.0f} s. Fix: wait for the other cubeline run to finish; the lock frees "
            "itself when that process exits."
        ) from exc


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        try:
            client.create_registered_model(
                model_name,
                description="Hyperspectral anomaly detector trained by cubeline.",
            )
        except MlflowException as exc2:
            if "already exists" not in str(exc2).lower():
                raise


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


def _metrics_json(metrics: Mapping[str, float]) -> str:
    # NaN is not JSON; store it as null and read it back as NaN.
    return json.dumps(
        {k: (None if math.isnan(float(v)) else float(v)) for k, v in sorted(metrics.items())}
    )


def _decode_metrics(raw: str) -> dict[str, float]:
    return {k: (math.nan if v is None else float(v)) for k, v in json.loads(raw).items()}


def version_metrics(mv: ModelVersion, split_id: str) -> dict[str, float] | None:
    """Return the metrics stored on a model version for ``split_id``, or None if never scored."""
    raw = mv.tags.get(f"{_TAG_EVAL_PREFIX}{split_id}")
    return None if raw is None else _decode_metrics(raw)


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


# --------------------------------------------------------------------------------------------
# Public operations
# --------------------------------------------------------------------------------------------


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
