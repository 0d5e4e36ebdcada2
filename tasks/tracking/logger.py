"""Lightning's ``MLFlowLogger`` attached to the flow's MLflow run."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger
from tasks.tracking.lineage import flatten_params

#: Most metrics MLflow takes in one ``log_batch`` call.
_MAX_METRICS_PER_BATCH = 1000


_SPLIT_PREFIXES = ("train/", "val/", "test/", "lr", "epoch", "phase1/", "phase2/")


def make_lightning_logger(
    run_id: str, tracking_uri: str, flush_interval_s: float = 10.0
) -> MLFlowLogger:
    """Return a Lightning ``MLFlowLogger`` that writes per-epoch metrics into an existing run.

    Changes from the stock logger, because the flow (not Lightning) owns the run:
    ``finalize`` does not mark the run FINISHED when ``fit`` ends (evaluation and registration
    still log into it), and Lightning's hyperparameters go under ``lightning.*`` so they cannot
    collide with the flattened ``params.yaml`` keys (MLflow refuses to change a logged param).

    Metrics are buffered and written in one ``log_batch`` once ``flush_interval_s`` has passed
    since the last write, and at ``finalize`` (also when ``fit`` fails): the stock logger's
    one store transaction per logging call adds up over an epoch with the SQLite store,
    while a long training still shows its curves in the UI every ``flush_interval_s``. (MLflow's
    own asynchronous logging was tried too: its flush waits on an idle queue, twice per run.)
    Each metric keeps the step and the time at which Lightning logged it.

    Args:
        run_id: The flow's MLflow run.
        tracking_uri: Tracking URI of that run (as returned by :func:`configure_mlflow`).
        flush_interval_s: Longest time metrics wait in the buffer while training runs.

    Returns:
        A logger to pass as ``GradientTrainer(logger=...)``.
    """
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from mlflow.entities import Metric

    class _RunAttachedMLFlowLogger(MLFlowLogger):
        _pending: list[Metric]
        _last_write = 0.0

        def log_hyperparams(self, params: Any) -> None:
            if not isinstance(params, Mapping):
                params = vars(params)
            flat = flatten_params(params, prefix="lightning")
            existing = self.experiment.get_run(self.run_id).data.params
            fresh = {k: v for k, v in flat.items() if existing.get(k) != v}
            if fresh:
                super().log_hyperparams(fresh)

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            if not hasattr(self, "_pending"):
                self._pending, self._last_write = [], time.monotonic()
            now_ms = int(time.time() * 1000)
            for key, value in metrics.items():
                if isinstance(value, str):
                    continue
                if not key.startswith(_SPLIT_PREFIXES):
                    # Per-epoch metric-node values are validation figures: under val/, apart from
                    # the test/ figures the gate reads.
                    key = f"val/{key}"
                name = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key
                # MLflow's allowed metric-name characters, as the stock logger sanitizes them.
                name = re.sub("[^a-zA-Z0-9_/. -]+", "", name)
                self._pending.append(Metric(name, float(value), now_ms, step or 0))
            if time.monotonic() - self._last_write >= flush_interval_s:
                self._write_pending()

        def _write_pending(self) -> None:
            pending = getattr(self, "_pending", [])
            for start in range(0, len(pending), _MAX_METRICS_PER_BATCH):
                self.experiment.log_batch(
                    run_id=self.run_id, metrics=pending[start : start + _MAX_METRICS_PER_BATCH]
                )
            self._pending, self._last_write = [], time.monotonic()

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            if getattr(self, "_pending", None):
                self._write_pending()
            if not self._initialized:
                return
            if self._checkpoint_callback:
                self._scan_and_log_checkpoints(self._checkpoint_callback)

    return _RunAttachedMLFlowLogger(run_id=run_id, tracking_uri=tracking_uri)
