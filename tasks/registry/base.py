"""Names the registry code shares: aliases, tags, errors, the fault hook, small MLflow look-ups."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from nodes.errors import CubelineError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
from tasks.registry.gate import PromotionDecision

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


#: ``<prefix><artifact>`` = SHA-256 of the model's pipeline YAML / weights, pinned at registration.
TAG_SHA256_PREFIX = "cubeline.sha256."


_TAG_REGISTERED_AT = "cubeline.registered_at"


_TAG_DECISION = "cubeline.decision"


_TAG_DECISION_REASON = "cubeline.decision_reason"


_METRIC_TAG_PREFIX = "metric."


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
