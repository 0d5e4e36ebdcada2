"""MLflow tracking helpers for cubeline runs: store set-up, params, lineage tags, evaluation plots.

One flow run is one MLflow run. This module owns everything that *writes into* that run apart
from the model itself (``tasks/pyfunc_model.py``) and the registry (``tasks/registry/``):

- :func:`configure_mlflow` points MLflow at an absolute SQLite store and artifact root (MLflow's
  own defaults are relative to the working directory) and fails fast on an unreachable server;
- :func:`flatten_params` turns the nested ``params.yaml`` into MLflow's flat string params;
- :func:`make_lightning_logger` attaches Lightning's ``MLFlowLogger`` to the flow's run;
- :func:`log_evaluation` writes ROC and precision-recall curves (Fawcett 2006, "An introduction to
  ROC analysis"; average precision as the step-wise area, as in scikit-learn), score histograms
  and per-frame anomaly maps, and logs them as artifacts;
- :func:`set_lineage_tags`, :func:`git_commit`, :func:`params_hash`: what produced the run.

mlflow, matplotlib and lightning are imported inside the functions that need them: importing
this module must stay cheap for the CLI (importing mlflow alone takes seconds).

Modules: ``store`` (set-up, locks), ``lineage`` (params, tags), ``logger`` (Lightning),
``plots`` (curves, maps). Import from ``tasks.tracking``.
"""

from tasks.tracking.lineage import (
    MAX_PARAM_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    TAG_DATA_HASH,
    TAG_GIT_COMMIT,
    TAG_INIT_STATE_HASH,
    TAG_PARAMS_HASH,
    code_version,
    flatten_params,
    git_commit,
    params_hash,
    set_lineage_tags,
)
from tasks.tracking.logger import make_lightning_logger
from tasks.tracking.plots import (
    average_precision,
    log_evaluation,
    pr_curve,
    roc_curve,
    write_anomaly_maps,
    write_evaluation_plots,
)
from tasks.tracking.store import (
    DEFAULT_EXPERIMENT,
    TRACKING_URI_ENV,
    LockTimeoutError,
    TrackingUnavailableError,
    configure_mlflow,
    lock_path,
    uri_lock,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MAX_PARAM_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "TAG_DATA_HASH",
    "TAG_GIT_COMMIT",
    "TAG_INIT_STATE_HASH",
    "TAG_PARAMS_HASH",
    "TRACKING_URI_ENV",
    "LockTimeoutError",
    "TrackingUnavailableError",
    "average_precision",
    "code_version",
    "configure_mlflow",
    "flatten_params",
    "git_commit",
    "lock_path",
    "log_evaluation",
    "make_lightning_logger",
    "params_hash",
    "pr_curve",
    "roc_curve",
    "set_lineage_tags",
    "uri_lock",
    "write_anomaly_maps",
    "write_evaluation_plots",
]
