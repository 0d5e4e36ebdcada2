"""Steps that bring frames in.

``load_cubes`` (read + validate, the design card's "load cu3s"), ingestion of new frames as a
data version, and combining an old version with new frames.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task

from nodes.errors import ConfigError
from tasks.env import repo_root
from tasks.params import load_params, resolve_path

if TYPE_CHECKING:

    pass
from tasks.steps.base import STEP_VERSIONS, DataRef, RunContext
from tasks.steps.data import (
    current_data_version,
    data_paths,
    datamodule_for,
    restore_version,
    version_store_dir,
)
from tasks.steps.run import mlflow_client, set_run_tags

log = logging.getLogger(__name__)


@task(name="load_cubes", version=STEP_VERSIONS["load_cubes"], persist_result=False)
def load_cubes(ctx: RunContext, data_version: str | None = None) -> DataRef:
    """Read and validate the frames (pandera) and return a reference to them.

    Args:
        ctx: Run context.
        data_version: A data version (``cubeline ingest``) to read, restored by its DVC hash
            with its own split; None reads ``params.yaml`` ``data`` (the files tracked by
            ``data.dvc``, split by its ids).

    Returns:
        Paths, DVC content hash, frame count and shape; never the tensors.

    Raises:
        DataValidationError: A frame fails validation (the pandera report names file, field,
            fix): the flow stops here, before anything is trained or registered.
        ConfigError: The data version is unknown here and on the DVC remote.
    """
    from nodes.data.readers import count_frames

    p = ctx.params
    annotation: str | None
    if data_version:
        info = restore_version(ctx, data_version)
        files = list(info.files)
        names = info.frame_names
        splits = (info.split.train, info.split.val, info.split.test)
        data_hash = recorded = info.version
        dirty = False
        annotation = info.annotation
    else:
        version = current_data_version(ctx)
        files = [str(f) for f in data_paths(ctx)]
        names = tuple(f"{Path(f).name}#{i}" for f in files for i in range(count_frames(f)))
        splits = (p.data.train_ids, p.data.val_ids, p.data.test_ids)
        data_hash, recorded, dirty = version.content_hash, version.recorded_hash, version.dirty
        annotation = (
            str(resolve_path(ctx.params_path, p.data.annotation_path))
            if p.data.annotation_path
            else None
        )
    info_dm = datamodule_for(ctx, data_hash, files, splits, annotation).describe()
    h, w, c = (int(v) for v in info_dm["shape"])
    ref = DataRef(
        paths=tuple(files),
        train_ids=splits[0],
        val_ids=splits[1],
        test_ids=splits[2],
        data_hash=data_hash,
        recorded_hash=recorded,
        dirty=dirty,
        num_frames=int(info_dm["num_frames"]),
        shape=(h, w, c),
        anomaly_pixels=int(info_dm["anomaly_pixels"]),
        frame_names=names,
        version=data_version or None,
        annotation=annotation,
    )
    return ref


def record_data(ctx: RunContext, data: DataRef) -> None:
    """Tag the run with the data it reads: hash, version and the frames of each split."""
    set_run_tags(
        ctx,
        {
            "cubeline.data_hash": data.data_hash,
            "cubeline.data_version": data.version or "",
            "cubeline.data_split": json.dumps(data.split_names, separators=(",", ":"))[:5000],
        },
    )


def ingest_files(
    params_path: str | Path,
    files: Sequence[str | Path],
    *,
    labels: str | Path | None = None,
    split: Any = None,
    parents: Sequence[str] = (),
) -> Any:
    """Validate frames and store them as a new data version (``cubeline ingest``).

    Args:
        params_path: ``params.yaml`` (band count, DVC remote, default split).
        files: Frame files in frame order.
        labels: COCO annotation file (None: the files carry their masks).
        split: A :class:`tasks.data_versions.Split` (None: ``params.yaml`` ``ingest``'s default).
        parents: Versions this one combines.

    Returns:
        The :class:`tasks.data_versions.DataVersionInfo` stored and pushed.
    """
    from tasks.data_versions import ingest_frames

    params = load_params(params_path)
    root = repo_root(Path(params_path).resolve().parent)
    return ingest_frames(
        files,
        root=root,
        remote=params.dvc.remote,
        versions_dir=resolve_path(params_path, params.dvc.versions_dir),
        expected_channels=params.data.expected_channels,
        normal_class_ids=params.pipeline.normal_class_ids,
        labels=labels,
        split=split,
        val_frames=params.ingest.val_frames,
        test_frames=params.ingest.test_frames,
        parents=parents,
    )


@task(name="ingest_inbox", version=STEP_VERSIONS["ingest_inbox"], persist_result=False)
def ingest_inbox(ctx: RunContext) -> str | None:
    """Turn the frames waiting in ``params.yaml`` ``ingest.inbox`` into a new data version.

    The files (and ``ingest.labels``, a COCO file, when present) are ingested in name order and
    then moved to ``<inbox>/.ingested/<md5>/``; invalid frames stay where they are and the
    error names them.

    Returns:
        The new version's hash, or None when the inbox holds no frame.
    """
    from tasks.data_versions import SUFFIXES

    p = ctx.params
    inbox = resolve_path(ctx.params_path, p.ingest.inbox)
    files = sorted(f for f in inbox.glob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
    if not files:
        log.info("inbox %s holds no frame: nothing to check", inbox)
        return None
    labels = inbox / p.ingest.labels
    info = ingest_files(ctx.params_path, files, labels=labels if labels.is_file() else None)
    done = inbox / ".ingested" / info.version.removesuffix(".dir")
    done.mkdir(parents=True, exist_ok=True)
    for f in [*files, labels]:
        if f.is_file():
            f.rename(done / f.name)
    return str(info.version)


@task(name="combine_data", version=STEP_VERSIONS["combine_data"], persist_result=False)
def combine_data(ctx: RunContext, data: DataRef, champion_run_id: str | None) -> DataRef:
    """``retrain.on_drift_data: old_and_new``: the champion's training frames + ``data``.

    The result is a data version of its own (validation and test frames: ``data``'s), so the
    run still trains on one explicit, restorable version.
    """
    from tasks.data_versions import DataVersionInfo, Split, combine_versions

    p = ctx.params
    if data.version is None:
        raise ConfigError(
            "retrain.on_drift_data: old_and_new combines a new data version with the champion's "
            "data; this run reads params.yaml data (no version): pass --data-version"
        )
    new = restore_version(ctx, data.version)
    old_version = ""
    if champion_run_id:
        tags = mlflow_client().get_run(champion_run_id).data.tags
        old_version = tags.get("cubeline.data_version", "")
    if old_version:
        old = restore_version(ctx, old_version)
    else:
        from nodes.data.readers import count_frames

        files = tuple(str(f) for f in data_paths(ctx))
        old = DataVersionInfo(
            version=current_data_version(ctx).content_hash,
            path=repo_root(Path(ctx.params_path).parent),
            files=files,
            split=Split(p.data.train_ids, p.data.val_ids, p.data.test_ids),
            annotation=None,
            frame_names=tuple(f"{Path(f).name}#{i}" for f in files for i in range(count_frames(f))),
            channels=data.channels,
        )
    combined = combine_versions(
        old,
        new,
        root=Path(ctx.root),
        remote=p.dvc.remote,
        versions_dir=version_store_dir(ctx),
        expected_channels=p.data.expected_channels,
        normal_class_ids=p.pipeline.normal_class_ids,
    )
    return load_cubes.fn(ctx, combined.version)
