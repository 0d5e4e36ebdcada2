"""Serve the champion: scoring requests on 127.0.0.1, new champions picked up without a restart.

``cubeline serve-model`` loads ``models:/<name>@<alias>`` from the MLflow registry as data only:
the logged pipeline YAML (node types looked up in cubeline's registry of node classes) and its
weights through ``torch.load(weights_only=True)`` -- no code from the artifact store is imported
or run (the pyfunc wrapper logged beside it is for MLflow's own tools). A background thread polls
the alias every ``poll_s`` seconds; on a move it loads the new version next to the old one and
then swaps one reference, so requests in flight finish on the model they started with and none is
dropped.

HTTP API (``http.server``, one thread per connection):

- ``GET /health`` → JSON: model, alias, version, when it was loaded, requests served.
- ``POST /score`` with a ``.npy`` body (float32, ``(H, W, C)`` or ``(B, H, W, C)``; read with
  ``allow_pickle=False``) → ``.npz`` with ``scores`` (raw RX score), ``logits`` and
  ``decisions``; header ``X-Cubeline-Model-Version`` names the version that scored.
  Bad input → 400 with a JSON ``error`` naming the field and the fix.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodes.errors import ContentHashError, CubelineError, DataValidationError

if TYPE_CHECKING:
    from nodes.graph.pipeline import Pipeline

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Cubeline-Model-Version"
MAX_BODY_BYTES = 2 << 30


@dataclass(frozen=True)
class LoadedModel:
    """One registered version, loaded.

    Attributes:
        model_name: Registered model.
        version: Its version.
        pipeline: The pipeline (CPU, eval mode).
        outputs: Output name → ``"<node>.<port>"``.
        loaded_at: ``time.time()`` when it was loaded.
    """

    model_name: str
    version: str
    pipeline: Pipeline
    outputs: dict[str, str]
    loaded_at: float

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return f"models:/{self.model_name}/{self.version}"


def load_version(model_name: str, version: str) -> LoadedModel:
    """Load one registered version as data (YAML + ``weights_only`` weights), never as code.

    Raises:
        RegistryError: The version's artifacts are not a cubeline pipeline model.
    """
    import mlflow
    import yaml

    from nodes.graph.pipeline import Pipeline
    from tasks.pyfunc_model import (
        DEFAULT_OUTPUTS,
        PIPELINE_CONFIG_ARTIFACT,
        PIPELINE_WEIGHTS_ARTIFACT,
    )
    from tasks.registry import RegistryError

    uri = f"models:/{model_name}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    try:
        doc = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
        flavor = doc["flavors"]["python_function"]
        artifacts = flavor["artifacts"]
        config = local / artifacts[PIPELINE_CONFIG_ARTIFACT]["path"]
        weights = local / artifacts[PIPELINE_WEIGHTS_ARTIFACT]["path"]
        outputs = dict((flavor.get("model_config") or {}).get("outputs", DEFAULT_OUTPUTS))
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise RegistryError(
            f"models:/{model_name}/{version} is not a cubeline pipeline model ({exc!r}); register "
            "models logged by tasks.pyfunc_model.log_pipeline_model"
        ) from None
    _check_pinned(model_name, str(version), {PIPELINE_CONFIG_ARTIFACT: config,
                                              PIPELINE_WEIGHTS_ARTIFACT: weights})
    pipeline = Pipeline.load_from_file(config, weights, device="cpu")
    pipeline.eval()
    return LoadedModel(model_name, str(version), pipeline, outputs, time.time())


def _check_pinned(model_name: str, version: str, files: dict[str, Path]) -> None:
    """Compare the downloaded files with the SHA-256 the registry pinned at registration.

    Raises:
        RegistryError: A file differs (the artifact store was changed after registration).
    """
    import hashlib

    import mlflow

    from tasks.registry import TAG_SHA256_PREFIX

    tags = mlflow.MlflowClient().get_model_version(model_name, version).tags
    for key, path in files.items():
        pinned = tags.get(f"{TAG_SHA256_PREFIX}{key}")
        if pinned is None:
            log.warning("models:/%s/%s pins no SHA-256 for %s (registered by an older cubeline)",
                        model_name, version, key)
            continue
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != pinned:
            raise ContentHashError(
                f"models:/{model_name}/{version}: {path.name} in the artifact store differs from "
                f"the file registered (sha256 {actual[:12]}... != {pinned[:12]}...); it was "
                "changed after registration. Fix: restore the artifact store from a backup, or "
                "roll the alias back (`cubeline rollback`) / promote another version"
            )


def load_alias(model_name: str, alias: str = "champion") -> LoadedModel:
    """Load the version ``alias`` points at.

    Raises:
        RegistryError: No such alias.
    """
    from tasks.registry import RegistryError, get_alias_version

    mv = get_alias_version(model_name, alias)
    if mv is None:
        import mlflow

        raise RegistryError(
            f"registered model {model_name!r} has no alias {alias!r} in registry "
            f"{mlflow.get_registry_uri()}. Fix: run `cubeline run` (it registers and promotes a "
            "model), or check registry.model_name in params.yaml"
        )
    return load_version(model_name, str(mv.version))


def read_cubes(body: bytes, expected_channels: int | None) -> np.ndarray:
    """Parse a ``.npy`` request body into float32 ``(B, H, W, C)`` cubes.

    Raises:
        DataValidationError: Not a ``.npy`` array, wrong rank, dtype or band count, or
            non-finite values.
    """
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataValidationError(
            f"request body: not a .npy array ({exc}); send np.save(buf, cube) bytes with "
            "Content-Type application/x-npy"
        ) from None
    if not isinstance(array, np.ndarray) or array.ndim not in (3, 4):
        raise DataValidationError(
            f"request body: expected a cube (H, W, C) or cubes (B, H, W, C), got shape "
            f"{getattr(array, 'shape', None)}; bands go last"
        )
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise DataValidationError(f"request body: dtype {array.dtype} is not numeric; send float32")
    cubes = np.asarray(array if array.ndim == 4 else array[None], dtype=np.float32)
    if expected_channels is not None and cubes.shape[-1] != expected_channels:
        raise DataValidationError(
            f"request body: {cubes.shape[-1]} bands, the model takes {expected_channels} "
            "(params.yaml data.expected_channels); bands go last"
        )
    if cubes.size == 0 or not np.isfinite(cubes).all():
        raise DataValidationError("request body: empty cube or NaN/inf values; send finite pixels")
    return cubes


class ModelServer:
    """The champion behind an HTTP endpoint, swapped when its alias moves.

    Args:
        model_name: Registered model.
        alias: Alias to follow.
        expected_channels: Band count requests must have (None: the model's check only).
        poll_s: Seconds between alias checks.
    """

    def __init__(
        self,
        model_name: str,
        alias: str = "champion",
        expected_channels: int | None = None,
        poll_s: float = 2.0,
    ) -> None:
        self.model_name = model_name
        self.alias = alias
        self.expected_channels = expected_channels
        self.poll_s = poll_s
        self.current = load_alias(model_name, alias)
        self.requests = 0
        self.swaps = 0
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="cubeline-alias-poll", daemon=True)

    def start_polling(self) -> None:
        """Follow the alias in the background."""
        self._poller.start()

    def stop(self) -> None:
        """Stop following the alias."""
        self._stop.set()

    def refresh(self) -> bool:
        """Load the alias's version if it moved; True when the served model changed."""
        from tasks.registry import get_alias_version

        mv = get_alias_version(self.model_name, self.alias)
        if mv is None or str(mv.version) == self.current.version:
            return False
        fresh = load_version(self.model_name, str(mv.version))
        old, self.current = self.current, fresh  # one reference swap: in-flight requests keep old
        self.swaps += 1
        print(
            f"cubeline serve-model: {self.model_name}@{self.alias} moved: version {old.version} -> "
            f"{fresh.version}, now serving it",
            flush=True,
        )
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as exc:
                log.warning("alias check failed (still serving v%s): %s", self.current.version, exc)

    def score(self, body: bytes) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        """Score a ``.npy`` body with the current model (the one it started with to the end)."""
        from tasks.pyfunc_model import score_cubes

        model = self.current
        cubes = read_cubes(body, self.expected_channels)
        out = score_cubes(model.pipeline, cubes, model.outputs)
        self.requests += 1
        return model, out

    def health(self) -> dict[str, Any]:
        """What is served."""
        m = self.current
        return {
            "model": m.model_name,
            "alias": self.alias,
            "version": m.version,
            "uri": m.uri,
            "loaded_at": m.loaded_at,
            "requests": self.requests,
            "swaps": self.swaps,
        }


def make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, body: bytes, ctype: str, version: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if version is not None:
                self.send_header(VERSION_HEADER, version)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._json(HTTPStatus.OK, server.health())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}; try /health"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/score":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}; POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY_BYTES:
                self._json(
                    HTTPStatus.BAD_REQUEST,
                    {"error": f"Content-Length {length}: send a .npy body of 1..{MAX_BODY_BYTES} "
                     "bytes"},
                )
                return
            body = self.rfile.read(length)
            try:
                model, out = server.score(body)
            except CubelineError as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            buf = io.BytesIO()
            np.savez(buf, **out)  # type: ignore[arg-type]
            self._send(HTTPStatus.OK, buf.getvalue(), "application/x-npz", model.version)

    return Handler


def serve_model(
    model_name: str,
    *,
    alias: str = "champion",
    host: str = "127.0.0.1",
    port: int = 8088,
    poll_s: float = 2.0,
    expected_channels: int | None = None,
    ready: threading.Event | None = None,
) -> None:
    """Serve ``models:/<model_name>@<alias>`` until SIGINT/SIGTERM.

    Args:
        model_name: Registered model.
        alias: Alias to follow.
        host: Address to bind (loopback by default).
        port: TCP port.
        poll_s: Seconds between alias checks.
        expected_channels: Band count requests must have.
        ready: Set once the server listens (tests).
    """
    import signal

    server = ModelServer(model_name, alias, expected_channels, poll_s)
    httpd = ThreadingHTTPServer((host, port), make_handler(server))
    httpd.daemon_threads = True

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    server.start_polling()
    print(
        f"cubeline serve-model: {model_name}@{alias} = version {server.current.version} on "
        f"http://{host}:{port} (POST /score with a .npy cube, GET /health); alias checked every "
        f"{poll_s:g} s",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        httpd.server_close()


def score_remote(url: str, cubes: np.ndarray, timeout: float = 60.0) -> tuple[str, dict[str, Any]]:
    """Client: POST cubes to a ``serve-model`` endpoint; returns (version, arrays)."""
    import urllib.request

    buf = io.BytesIO()
    np.save(buf, np.asarray(cubes, dtype=np.float32), allow_pickle=False)
    req = urllib.request.Request(
        url.rstrip("/") + "/score",
        data=buf.getvalue(),
        headers={"Content-Type": "application/x-npy"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        version = resp.headers.get(VERSION_HEADER, "")
        with np.load(io.BytesIO(resp.read()), allow_pickle=False) as z:
            return version, {k: z[k] for k in z.files}
