#!/usr/bin/env bash
# Set up cubeline into .venv/ at the repo root and restore the bundled data with DVC.
# Idempotent: a second run only checks. Offline apart from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."

export DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
       PREFECT_SERVER_ANALYTICS_ENABLED=false PIP_DISABLE_PIP_VERSION_CHECK=1

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cubeline-installed
want=$(cat requirements.lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and pinned: the local 2.13.0 CPU wheel, never a multi-GB CUDA build that an
  # unpinned requirement (lightning, torchmetrics) would otherwise pull.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -r requirements.lock.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# The bundled scenes come back from the DVC remote inside the repo (dvc-remote/): no network.
.venv/bin/dvc pull -q

# The same session as one multi-frame .npz (the SDK-free stand-in for a .cu3s file, for the
# reference guide's SingleCu3sDataModule examples), built from those scenes; kept out of data/.
if [ ! -f outputs/session.npz ]; then
  .venv/bin/python scripts/build_session_npz.py --out outputs/session.npz > /dev/null
fi
