#!/usr/bin/env bash
# Set up the two peer environments that bench/peers.py drives, OUTSIDE the project's .venv and
# outside CI (cuvis-ai pulls torch, torchvision, transformers, opencv, tensorboard, grpc: several
# GB; it must never leak into the project's lock file).
#
#   bash bench/envs/setup_peers.sh              # both peers into /work/peers
#   PEERS_DIR=/opt/peers bash bench/envs/setup_peers.sh
#   CUVIS_TORCH=torch===2.13.0 ...              # torch spec for the cuvis-ai venv (see below)
#
# cuvis-ai declares `torch>=2.11` and `torchvision>=0.26`. PyPI's Linux x86_64 torchvision wheels
# are CUDA builds (0.28.0+cu130 links libtorch_cuda), so with a CPU-only torch cuvis-ai fails at
# import ("operator torchvision::nms does not exist"). Hence PyPI's CUDA build of torch, of the
# same release as the project's (2.13.0): about 6.6 GB with its nvidia-* wheels, and it runs on
# CPU-only machines too (same ATen CPU kernels). `===` asks for exactly "2.13.0", not a local
# "2.13.0+cpu" wheel that a find-links folder may offer. Override with CUVIS_TORCH /
# CUVIS_TORCHVISION.
# Idempotent: a second run only checks the pinned versions.
set -euo pipefail

PEERS_DIR=${PEERS_DIR:-/work/peers}
PY=${PYTHON:-python3}
CUVIS_AI_VERSION=${CUVIS_AI_VERSION:-0.19.3}
SPECTRAL_VERSION=${SPECTRAL_VERSION:-0.25}
CUVIS_TORCH=${CUVIS_TORCH:-torch===2.13.0}
CUVIS_TORCHVISION=${CUVIS_TORCHVISION:-torchvision===0.28.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 DO_NOT_TRACK=true HF_HUB_OFFLINE=1

mkdir -p "$PEERS_DIR"

# Spectral Python: pure Python on numpy.
SV="$PEERS_DIR/spectral-venv"
[ -x "$SV/bin/pip" ] || { rm -rf "$SV"; "$PY" -m venv "$SV"; }
"$SV/bin/pip" install -q "spectral==$SPECTRAL_VERSION" numpy
"$SV/bin/python" -c "import spectral, numpy; print('spectral', spectral.__version__, 'numpy', numpy.__version__)"

# cuvis-ai: torch first and pinned, so that the unpinned `torch>=2.11` of cuvis-ai and
# cuvis-ai-core cannot pick a different build.
CV="$PEERS_DIR/cuvis-venv"
[ -x "$CV/bin/pip" ] || { rm -rf "$CV"; "$PY" -m venv "$CV"; }
"$CV/bin/pip" install -q "$CUVIS_TORCH" "$CUVIS_TORCHVISION"
"$CV/bin/pip" install -q "$CUVIS_TORCH" "$CUVIS_TORCHVISION" "cuvis-ai==$CUVIS_AI_VERSION"
"$CV/bin/pip" check
"$CV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
for name in ("cuvis-ai", "cuvis-ai-core", "cuvis-ai-schemas", "torch"):
    print(name, md.version(name))
print("cuda build:", torch.version.cuda)
import torchvision.ops  # noqa: F401  fails at import when torch and torchvision builds differ
import cuvis_ai.node  # noqa: F401
try:
    import cuvis  # noqa: F401  Cubert's native SDK bindings: not needed by the nodes we run
    print("cuvis SDK: importable")
except Exception as exc:  # noqa: BLE001
    print("cuvis SDK: not importable (", type(exc).__name__, exc, ")")
PY
