"""Step ``register_model`` (the gate decides the aliases) and the no-copies check before it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task

from nodes.errors import CubelineError

if TYPE_CHECKING:

    pass
from tasks.steps.base import (
    STEP_VERSIONS,
    DataRef,
    EvalResult,
    RegistrationSummary,
    RunContext,
    TrainResult,
)
from tasks.steps.cache import short_digest
from tasks.steps.data import run_datamodule
from tasks.steps.evaluate import score_split
from tasks.steps.run import ensure_active_run, mlflow_client, set_run_tags

log = logging.getLogger(__name__)


@task(name="register_model", version=STEP_VERSIONS["register_model"], persist_result=False)
def register_model(
    ctx: RunContext,
    data: DataRef,
    trained: TrainResult,
    evaluation: EvalResult,
    phase1: str = "fitted",
    fp: str | None = None,
) -> RegistrationSummary:
    """Log the model (with signature), register a version, gate it, move the aliases.

    ``challenger`` always moves to the new version; ``champion`` only when the gate of
    ``params.yaml`` says so (inside a Prefect transaction, see :mod:`tasks.registry`). A
    champion never scored on this split is re-scored here on the same test frames first. The
    version carries ``fp`` (:func:`fingerprint`; computed here when not given) and the SHA-256
    of its files, and ``phase1`` goes into its one-line description.
    """
    import numpy as np

    from nodes.graph.pipeline import Pipeline
    from tasks.faults import fault
    from tasks.pyfunc_model import SHA256_METADATA, log_pipeline_model
    from tasks.registry import (
        TAG_FINGERPRINT,
        TAG_SHA256_PREFIX,
        THRESHOLD_METRIC,
        register_and_promote,
        version_metrics,
    )

    fault("register")
    p = ctx.params
    ensure_active_run(ctx)
    assert ctx.run_id is not None
    pipeline = Pipeline.load_from_file(trained.config_path)
    dm = run_datamodule(ctx, data)
    example = dm.get_frame(data.test_ids[0]).cube[None].astype(np.float32)
    info = log_pipeline_model(
        pipeline,
        input_example=example,
        pipeline_name=p.pipeline.name,
        description=f"cubeline {p.pipeline.name}, data {data.data_hash}, init {trained.state_hash}",
    )

    def reevaluate(champion: Any, split_id: str) -> dict[str, float]:
        from nodes.library.metrics import AnomalyDetectionMetrics
        from tasks.serving import load_version

        # As data (YAML + weights_only, checked against the registered SHA-256), never as code.
        champ = load_version(p.registry.model_name, str(champion.version)).pipeline
        try:
            score_split(champ, dm, "test")
        except (RuntimeError, ValueError, CubelineError) as exc:
            # Another band count or pipeline: not comparable -- a recorded "keep" decision
            # (the champion has no finite score on this split), not a crash.
            log.warning("champion v%s cannot score this data (%s): not comparable",
                        champion.version, exc)
            return {p.registry.gate.metric: float("nan")}
        return {
            f"{m.name}/{k}": float(v)
            for m in champ.node_list()
            if isinstance(m, AnomalyDetectionMetrics)
            for k, v in m.compute().items()
        }

    result = register_and_promote(
        ctx.run_id,
        info.model_uri,
        {
            **evaluation.metrics,
            **({THRESHOLD_METRIC: trained.threshold} if trained.threshold is not None else {}),
        },
        evaluation.split_id,
        p.registry.gate,
        p.registry.model_name,
        reason_context=ctx.reason,
        reevaluate_champion=reevaluate,
        tags={
            TAG_FINGERPRINT: fp or fingerprint(ctx, data, trained.state_hash),
            # The registry pins the files it serves: tasks.serving checks them at every load.
            **{
                f"{TAG_SHA256_PREFIX}{k}": v
                for k, v in ((info.metadata or {}).get(SHA256_METADATA) or {}).items()
            },
        },
        description=(
            f"{ctx.reason}; data {data.data_hash[:12]} ({len(data.train_ids)} training frames), "
            f"Phase 1 {phase1}, test {p.registry.gate.metric} "
            f"{evaluation.metrics.get(p.registry.gate.metric, float('nan')):.4f}"
        ),
    )
    champion_metrics: dict[str, float] = {}
    if result.previous_champion_version is not None and not result.unchanged:
        prev = mlflow_client().get_model_version(
            result.model_name, result.previous_champion_version
        )
        champion_metrics = version_metrics(prev, evaluation.split_id) or {}
    return RegistrationSummary(
        model_name=result.model_name,
        version=result.version,
        alias=result.alias,
        promoted=result.decision.promote,
        reason=result.decision.reason,
        champion_version=result.champion_version,
        previous_champion_version=result.previous_champion_version,
        model_uri=info.model_uri,
        champion_metrics=champion_metrics,
        unchanged=result.unchanged,
    )


def fingerprint(ctx: RunContext, data: DataRef, state_hash: str) -> str:
    """What fixes a trained model: data, its split, params, Phase-1 state and code."""
    from tasks.tracking import code_version

    return short_digest(
        data.data_hash,
        json.dumps(data.split_names, sort_keys=True),
        data.annotation is not None,
        ctx.params.section_hash(),
        state_hash,
        code_version(Path(ctx.root)),
    )


@task(name="find_unchanged", version=STEP_VERSIONS["find_unchanged"], persist_result=False)
def find_unchanged(ctx: RunContext, fp: str) -> str | None:
    """The registered version with :func:`fingerprint` ``fp`` (same data, params, state, code).

    Phase 2 is seeded, so such a run would reproduce that version: the flow then registers
    nothing and says ``unchanged: version N`` (``retrain.skip_unchanged``).
    """
    from tasks.registry import TAG_FINGERPRINT, find_versions_by_tag

    set_run_tags(ctx, {TAG_FINGERPRINT: fp})
    if not ctx.params.retrain.skip_unchanged:
        return None
    versions = find_versions_by_tag(ctx.params.registry.model_name, TAG_FINGERPRINT, fp)
    return versions[0] if versions else None
