"""Model-registry promotion behind a metric gate, with aliases, durable history and rollback.

The decision and the side effects are kept apart:

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
- The whole read → decide → write sequence holds an exclusive lock (:mod:`tasks.registry.lock`).
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

Modules: ``gate`` (the pure decision), ``promotion`` (register, promote, roll back), ``lock``,
``history`` and ``base`` (tags, errors, look-ups). Import from ``tasks.registry``.
"""

from tasks.registry.base import (
    CHALLENGER,
    CHAMPION,
    FAULT_ENV,
    TAG_FINGERPRINT,
    TAG_SHA256_PREFIX,
    InjectedFaultError,
    RegistrationResult,
    RegistryError,
    find_versions_by_tag,
    get_alias_version,
    version_metrics,
)
from tasks.registry.gate import (
    THRESHOLD_METRIC,
    GateConfig,
    GateLike,
    PromotionDecision,
    as_gate,
    decide_promotion,
    split_id_of,
)
from tasks.registry.history import HistoryEntry, champion_history
from tasks.registry.lock import LOCK_ENV
from tasks.registry.promotion import promote_version, register_and_promote, rollback

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "FAULT_ENV",
    "LOCK_ENV",
    "TAG_FINGERPRINT",
    "TAG_SHA256_PREFIX",
    "THRESHOLD_METRIC",
    "GateConfig",
    "GateLike",
    "HistoryEntry",
    "InjectedFaultError",
    "PromotionDecision",
    "RegistrationResult",
    "RegistryError",
    "as_gate",
    "champion_history",
    "decide_promotion",
    "find_versions_by_tag",
    "get_alias_version",
    "promote_version",
    "register_and_promote",
    "rollback",
    "split_id_of",
    "version_metrics",
]
