"""Prefect flows of cubeline: wiring only (the steps live in :mod:`tasks.steps`).

- :func:`flows.train.train` -- two-phase training from scratch;
- :func:`flows.retrain.retrain` -- drift check against the champion's initialization state,
  re-initialization (Phase 1) only on drift, Phase 2, evaluation, registration behind the gate;
- :func:`flows.drift_watch.drift_watch` -- new frames (a data version, or the inbox) checked in
  one streaming pass; a Prefect event ``cubeline.drift.detected`` naming the version on drift;
- :mod:`flows.chain` -- the steps ``train`` and ``retrain`` share once Phase 1 is settled;
- :mod:`flows.deploy` -- the schedules and the drift-event trigger, served against a Prefect
  server; :mod:`flows.cli` -- the ``cubeline`` command.

Flows take the path of ``params.yaml``; :func:`for_repo` binds a flow to the repository's result
storage (``<repo>/.prefect/results``; the Phase-1 step cache is cubeline's own JSON under
``steps/`` there, see :mod:`tasks.steps`). Nothing is imported here at
module level: ``cubeline --help`` must stay instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.env import RESULTS_DIR, results_dir

__all__ = ["RESULTS_DIR", "for_repo", "results_dir"]

if TYPE_CHECKING:
    from prefect import Flow

F = TypeVar("F", bound="Flow[Any, Any]")

def for_repo(flow: F, root: Path) -> F:
    """``flow`` persisting its cached step results under ``root/.prefect/results``."""
    path = results_dir(root)
    path.mkdir(parents=True, exist_ok=True)
    return flow.with_options(result_storage=path)  # type: ignore[return-value]
