"""The Phase-1 step cache: keys and entries.

``fit_statistics`` reuses an earlier fit under a cache key: DVC content hash of the data + hash
of the ``params.yaml`` sections the step reads + the step's code (its ``version`` and a digest of
its source) + the repository root. A re-run with unchanged data and params therefore skips Phase 1
without hashing a tensor. The entry is a small JSON file under ``<repo>/.prefect/results/steps/``
(ignored by git), validated field by field when read, never unpickled; the state it names is
restored and checked against its DVC hash before use.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from prefect.context import TaskRunContext

from tasks.steps.base import DataRef, RunContext

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def short_digest(*parts: object) -> str:
    """A 20-hex-digit SHA-256 of the parts' string forms."""
    blob = json.dumps([str(p) for p in parts], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def code_digest(fn: Callable[..., Any]) -> str:
    """A digest of a function's source (``nosource`` where it cannot be read)."""
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:12]
    except (OSError, TypeError):
        return "nosource"


def step_key(sections: tuple[str, ...]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Cache key: data hash + params sections + code + repository, for a step's task."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        ctx: RunContext = parameters["ctx"]
        data: DataRef = parameters["data"]
        t = context.task
        return "-".join(
            (
                t.name,
                f"v{t.version}",
                code_digest(t.fn),
                data.data_hash.replace(".", "_"),
                ctx.params.section_hash(*sections),
                short_digest(Path(ctx.root).resolve()),
            )
        )

    return key


def cache_file(ctx: RunContext, key: str) -> Path:
    """The JSON file that holds the cache entry of ``key``."""
    from tasks.env import results_dir

    return results_dir(Path(ctx.root)) / "steps" / f"{key}.json"


def cache_get(ctx: RunContext, key: str, cls: type[_T]) -> _T | None:
    """A cached step result: plain JSON checked field by field (pydantic), never code.

    Prefect's own result persistence would unpickle whatever a result file holds; a step result
    here is a small typed value, so JSON is enough, and a file that does not validate is a miss.
    """
    from pydantic import TypeAdapter, ValidationError

    path = cache_file(ctx, key)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        return TypeAdapter(cls).validate_json(raw, strict=False)
    except ValidationError as exc:
        log.warning("ignoring step cache entry %s: not a valid %s (%s)", path, cls.__name__,
                    exc.error_count())
        return None


def cache_put(ctx: RunContext, key: str, value: Any) -> None:
    """Write a step result as JSON, atomically (temporary file + rename)."""
    from tasks.env import atomic_write_bytes

    try:
        atomic_write_bytes(cache_file(ctx, key), json.dumps(asdict(value)).encode())
    except OSError as exc:  # a read-only cache costs a refit next time, nothing else
        log.warning("step cache not written (%s)", exc)
