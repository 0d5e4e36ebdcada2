"""The Prefect tasks of cubeline: one module per pipeline step, thin wrappers around ``nodes``.

==================  =================================================================
module              steps
==================  =================================================================
``load``            ``load_cubes`` (read + pandera-validate the frames), ``ingest_inbox``,
                    ``combine_data``; ``ingest_files`` behind ``cubeline ingest``
``fit``             ``fit_statistics`` (Phase 1; the state versioned with DVC, cached)
``drift``           ``drift_check``, ``emit_drift_event``
``unfreeze``        ``unfreeze``
``train``           ``gradient_train`` (Phase 2)
``evaluate``        ``evaluate``
``register``        ``find_unchanged``, ``register_model``
==================  =================================================================

What they share: ``base`` (step versions and the small typed values steps pass: paths, DVC
hashes, run ids, metric dicts, never tensors), ``cache`` (the Phase-1 step cache), ``data``
(datamodule, pipeline and state helpers) and ``run`` (the flow run's MLflow run). The flows wire
the steps (``flows/chain.py``); ``tasks.predict`` holds the functions behind ``cubeline predict``.
"""

from tasks.steps.base import (
    DRIFT_EVENT,
    STEP_VERSIONS,
    DataRef,
    DriftResult,
    EvalResult,
    InitStateRef,
    PipelineRef,
    RegistrationSummary,
    RunContext,
    RunSummary,
    TrainResult,
)
from tasks.steps.data import build_pipeline
from tasks.steps.drift import drift_check, emit_drift_event
from tasks.steps.evaluate import evaluate, score_split
from tasks.steps.fit import fit_statistics
from tasks.steps.load import combine_data, ingest_files, ingest_inbox, load_cubes, record_data
from tasks.steps.register import find_unchanged, fingerprint, register_model
from tasks.steps.run import describe_trigger, set_run_tags, tracked_run
from tasks.steps.train import gradient_train
from tasks.steps.unfreeze import unfreeze
from tasks.tracking.reconcile import reconcile_dead_runs

__all__ = [
    "DRIFT_EVENT",
    "STEP_VERSIONS",
    "DataRef",
    "DriftResult",
    "EvalResult",
    "InitStateRef",
    "PipelineRef",
    "RegistrationSummary",
    "RunContext",
    "RunSummary",
    "TrainResult",
    "build_pipeline",
    "combine_data",
    "describe_trigger",
    "drift_check",
    "emit_drift_event",
    "evaluate",
    "find_unchanged",
    "fingerprint",
    "fit_statistics",
    "gradient_train",
    "ingest_files",
    "ingest_inbox",
    "load_cubes",
    "reconcile_dead_runs",
    "record_data",
    "register_model",
    "score_split",
    "set_run_tags",
    "tracked_run",
    "unfreeze",
]
