"""What produced a run: flattened params, their hash, the code version, lineage tags."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from tasks.tracking.store import TrackingUnavailableError

#: MLflow 3.17's limits (``MAX_PARAM_VAL_LENGTH`` and ``MAX_ENTITY_KEY_LENGTH`` in
#: ``mlflow.utils.validation``), copied so that flattening params does not import mlflow. A test
#: checks they still agree.
MAX_PARAM_VALUE_LENGTH = 6000


MAX_PARAM_KEY_LENGTH = 250


TAG_DATA_HASH = "cubeline.data_hash"


TAG_INIT_STATE_HASH = "cubeline.init_state_hash"


TAG_PARAMS_HASH = "cubeline.params_hash"


TAG_GIT_COMMIT = "cubeline.git_commit"


#: MLflow's own tag, shown in its UI's run page.
_MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"


def _param_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, Path):
        text = value.as_posix()
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        # Marked, so nobody mistakes a clipped value for the real one.
        marker = "...[truncated]"
        text = text[: MAX_PARAM_VALUE_LENGTH - len(marker)] + marker
    return text


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested params into MLflow's flat ``{"a.b.c": "value"}`` string form.

    Lists of scalars are joined with commas (``[1, 2]`` → ``"1,2"``); lists holding mappings get
    their index in the key (``a.0.b``). Empty mappings and lists are kept as ``"{}"``/``""`` so
    the key still shows in the run. Values longer than MLflow's limit (6000 characters) are cut
    and end in ``...[truncated]``.

    Args:
        d: Nested mapping, e.g. the parsed ``params.yaml``.
        prefix: Key prefix (without the trailing dot).

    Returns:
        Flat mapping of dotted keys to strings.

    Raises:
        ValueError: A flattened key is longer than MLflow's 250-character key limit.
    """
    out: dict[str, str] = {}

    def key_of(k: Any) -> str:
        key = f"{prefix}.{k}" if prefix else str(k)
        if len(key) > MAX_PARAM_KEY_LENGTH:
            raise ValueError(
                f"Param key {key[:60]!r}... is {len(key)} characters, over MLflow's "
                f"{MAX_PARAM_KEY_LENGTH}. Fix: shorten the nesting in params.yaml."
            )
        return key

    for k, v in d.items():
        key = key_of(k)
        if isinstance(v, Mapping):
            if v:
                out.update(flatten_params(v, key))
            else:
                out[key] = "{}"
        elif _is_sequence(v):
            if any(isinstance(item, Mapping) or _is_sequence(item) for item in v):
                out.update(flatten_params({str(i): item for i, item in enumerate(v)}, key))
            else:
                out[key] = _param_value(",".join(_param_value(item) for item in v))
        else:
            out[key] = _param_value(v)
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """Return the SHA-256 (hex) of ``params`` in canonical JSON (sorted keys, no spaces).

    Key order in ``params.yaml`` does not change the hash; any value does.
    """
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def git_commit(repo_root: Path) -> str:
    """Return ``git rev-parse HEAD`` of ``repo_root``, with ``+dirty`` if the tree has changes.

    Untracked files that git does not ignore count as changes (they may be code). Returns
    ``"unknown"`` when ``repo_root`` is not a git checkout or git is missing: lineage is then
    carried by the data/params hashes alone.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # status must not take index.lock

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True,
                              check=True, timeout=30, env=env).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}+dirty" if status else head


def code_version(repo_root: Path) -> str:
    """:func:`git_commit`, plus a digest of the uncommitted changes when the tree is dirty.

    Two runs of one dirty tree compare equal only when their changes are the same (tracked
    diffs and the names and contents of untracked, unignored files).
    """
    commit = git_commit(repo_root)
    if not commit.endswith("+dirty"):
        return commit
    import hashlib

    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    digest = hashlib.sha256()
    try:
        for args in (["diff", "HEAD", "--binary"], ["ls-files", "-o", "--exclude-standard", "-z"]):
            out = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, check=True,
                                 timeout=60, env=env).stdout
            digest.update(out)
            if args[0] == "ls-files":
                for name in filter(None, out.split(b"\0")):
                    path = repo_root / name.decode()
                    if path.is_file():
                        digest.update(path.read_bytes())
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return commit
    return f"{commit}:{digest.hexdigest()[:16]}"


def set_lineage_tags(
    data_hash: str,
    init_state_hash: str,
    params_hash: str,
    git_commit: str,
    run_id: str | None = None,
) -> dict[str, str]:
    """Tag the run with what produced it: data, initialization state, params and code.

    Args:
        data_hash: DVC content hash of the input data.
        init_state_hash: Content hash of the Phase-1 initialization state used.
        params_hash: :func:`params_hash` of the effective params.
        git_commit: :func:`git_commit` of the code.
        run_id: Run to tag; None tags the active run.

    Returns:
        The tags written.

    Raises:
        TrackingUnavailableError: No run given and none active.
    """
    import mlflow

    tags = {
        TAG_DATA_HASH: data_hash,
        TAG_INIT_STATE_HASH: init_state_hash,
        TAG_PARAMS_HASH: params_hash,
        TAG_GIT_COMMIT: git_commit,
        _MLFLOW_GIT_COMMIT_TAG: git_commit,
    }
    target = _resolve_run_id(run_id)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(target, key, value)
    return tags


def _resolve_run_id(run_id: str | None) -> str:
    import mlflow

    if run_id is not None:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise TrackingUnavailableError(
            "No MLflow run is active and no run_id was given. Fix: call inside "
            "`with mlflow.start_run():` or pass run_id=."
        )
    return active.info.run_id
