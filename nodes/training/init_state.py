"""Save and restore the initialization state alone (the guide's "Option 2"), with metadata.

The state file is a ``torch.save`` d dict of plain tensors — the fitted buffers of every
statistical node plus the raw-band moments of the training data — loadable with
``torch.load(weights_only=True)``. A JSON sidecar records version, creation date, the content
hash of the source data, the pixel count and the nodes, so a state can be audited and matched to
its data (the orchestration layer versions both files with DVC).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nodes.errors import ConfigError
from nodes.graph.pipeline import Pipeline
from nodes.training.statistical_trainer import FitReport
from nodes.training.stats import MomentState

STATE_FORMAT = "cubeline.init_state/1"


@dataclass
class InitStateInfo:
    """Metadata of an initialization state (the JSON sidecar)."""

    format: str
    version: str
    created: str
    source_data_hash: str
    pixel_count: int
    passes: int
    nodes: dict[str, str]
    root: str
    content_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _cubeline_version() -> str:
    try:
        from importlib.metadata import version

        return version("cubeline")
    except Exception:
        return "0+unknown"


def _data_root(report: FitReport) -> str:
    """The root holding the raw cube moments (the first, i.e. most upstream, root)."""
    if not report.root_moments:
        raise ConfigError("the fit report holds no moments; run StatisticalTrainer.fit() first")
    return next(iter(k for k in report.root_moments if k.endswith(".cube")),
                next(iter(report.root_moments)))


def save_init_state(pipeline: Pipeline, path: str | Path, *, source_data_hash: str,
                    fit_report: FitReport, extra: dict[str, Any] | None = None,
                    record_time: bool = True) -> InitStateInfo:
    """Write ``path`` (.pt) and ``path`` with suffix ``.json``; returns the metadata.

    Args:
        pipeline: The fitted pipeline.
        path: Target ``.pt`` file (the sidecar goes beside it).
        source_data_hash: Content hash of the data the statistics came from.
        fit_report: The fit's report (its root moments are stored for drift checks).
        extra: Free-form metadata for the sidecar.
        record_time: Write the creation time into the sidecar. Pass False where the state is
            content-addressed (versioned by the hash of both files): then the same fit of the
            same data gives the same hash, and the time lives with whoever records the hash.
    """
    path = Path(path)
    stat_nodes = [n for n in pipeline.node_list() if n.requires_initial_fit]
    for n in stat_nodes:
        n.check_initialized()
    root = _data_root(fit_report)
    payload = {
        "format": STATE_FORMAT,
        "nodes": {
            n.name: {k: v.detach().cpu().clone() for k, v in n.state_dict().items()}
            for n in stat_nodes
        },
        "moments": {k: m.to_dict() for k, m in fit_report.root_moments.items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    blob = buf.getvalue()
    info = InitStateInfo(
        format=STATE_FORMAT,
        version=_cubeline_version(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds") if record_time else "",
        source_data_hash=source_data_hash,
        pixel_count=fit_report.root_moments[root].count,
        passes=fit_report.passes,
        nodes={n.name: type(n).__name__ for n in stat_nodes},
        root=root,
        content_sha256=hashlib.sha256(blob).hexdigest(),
        extra=dict(extra or {}),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_json = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".json.tmp")
    try:
        tmp.write_bytes(blob)
        tmp_json.write_text(json.dumps(asdict(info), indent=2) + "\n")
        tmp.replace(path)
        tmp_json.replace(path.with_suffix(".json"))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
    return info


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"initialization state {path} does not exist")
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ConfigError(
            f"initialization state {path} cannot be loaded with weights_only=True: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path} is not a cubeline initialization state ({STATE_FORMAT})")
    return payload


def read_init_info(path: str | Path) -> InitStateInfo:
    """Read the JSON sidecar of a state file."""
    meta = Path(path).with_suffix(".json")
    if not meta.is_file():
        raise ConfigError(f"initialization state metadata {meta} does not exist")
    return InitStateInfo(**json.loads(meta.read_text()))


def read_init_moments(path: str | Path, root: str | None = None) -> MomentState:
    """The raw-band training moments stored in a state (what drift checks compare against)."""
    path = Path(path)
    payload = _read_payload(path)
    moments = payload["moments"]
    key = root or next((k for k in moments if k.endswith(".cube")), next(iter(moments)))
    if key not in moments:
        raise ConfigError(f"{path} holds no moments for {key!r}; it has {sorted(moments)}")
    return MomentState.from_dict(moments[key])


def load_init_state(pipeline: Pipeline, path: str | Path) -> InitStateInfo:
    """Restore the fitted buffers of the statistical nodes from ``path`` (all or nothing)."""
    path = Path(path)
    payload = _read_payload(path)
    states: dict[str, dict[str, torch.Tensor]] = payload["nodes"]
    unknown = sorted(set(states) - set(pipeline.nodes))
    if unknown:
        raise ConfigError(
            f"{path} holds nodes {unknown} that pipeline {pipeline.name!r} does not have "
            f"(it has {list(pipeline.nodes)}); build the pipeline the state was fitted with"
        )
    # Check every shape first so a mismatch leaves the pipeline untouched.
    for name, sd in states.items():
        own = pipeline.nodes[name].state_dict()
        for k, v in sd.items():
            if k not in own:
                raise ConfigError(f"{path}: node {name!r} has no buffer {k!r}")
            if own[k].numel() and own[k].shape != v.shape:
                raise ConfigError(
                    f"{path}: {name}.{k} has shape {tuple(v.shape)}, the pipeline expects "
                    f"{tuple(own[k].shape)} (different channel count?)"
                )
    pipeline.load_state_dict_resizing(
        {f"nodes.{name}.{k}": v for name, sd in states.items() for k, v in sd.items()},
        source=str(path),
        strict=False,
    )
    meta = path.with_suffix(".json")
    if meta.is_file():
        return read_init_info(path)
    return InitStateInfo(STATE_FORMAT, "unknown", "", "", 0, 0,
                         {n: type(pipeline.nodes[n]).__name__ for n in states}, "")
