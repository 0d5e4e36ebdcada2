"""What the steps share for data and models: the datamodule, the pipeline, restored states."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.errors import ConfigError
from tasks.params import Params, resolve_path

if TYPE_CHECKING:

    from nodes.data.datamodule import CubeDataModule
    from nodes.graph.pipeline import Pipeline
    from nodes.training.statistical_trainer import StatisticalTrainer
from tasks.steps.base import DataRef, RunContext


def data_paths(ctx: RunContext) -> list[Path]:
    """The frame paths of ``params.yaml``, resolved against its folder."""
    return [resolve_path(ctx.params_path, p) for p in ctx.params.data.paths]


def current_data_version(ctx: RunContext) -> Any:
    """The data version of the checkout's DVC-tracked frames (pulled if missing)."""
    from tasks.versioning import data_version, ensure_data

    p = ctx.params
    root = Path(ctx.root)
    ensure_data(root, p.data.dvc_file, p.dvc.remote)
    return data_version(root, p.data.dvc_file, data_paths(ctx))


#: One validated datamodule per process: tasks of one flow run share it instead of re-reading
#: and re-validating every frame (the data hash is part of the key, so a change is never missed).
_DM_MEMO: dict[tuple[object, ...], CubeDataModule] = {}


def datamodule_for(
    ctx: RunContext,
    data_hash: str,
    paths: Sequence[str],
    splits: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    annotation: str | None,
) -> CubeDataModule:
    """A set-up (hence pandera-validated) datamodule over ``paths``, shared within the process."""
    from nodes.data.datamodule import CubeDataModule

    p = ctx.params
    key = (
        data_hash,
        tuple(paths),
        splits,
        annotation,
        p.section_hash("data"),
        p.pipeline.normal_class_ids,
    )
    dm = _DM_MEMO.get(key)
    if dm is None:
        train, val, test = splits
        dm = CubeDataModule(
            list(paths),
            list(train),
            list(val),
            list(test),
            batch_size=p.data.batch_size,
            annotation_path=annotation,
            expected_channels=p.data.expected_channels,
            normal_class_ids=p.pipeline.normal_class_ids,
            seed=p.phase2.seed,
        )
        dm.setup("fit")
        _DM_MEMO.clear()
        _DM_MEMO[key] = dm
    return dm


def run_datamodule(ctx: RunContext, data: DataRef) -> CubeDataModule:
    """The validated datamodule of a step's data (shared within the process)."""
    return datamodule_for(
        ctx,
        data.data_hash,
        data.paths,
        (data.train_ids, data.val_ids, data.test_ids),
        data.annotation,
    )


def build_pipeline(
    params: Params, input_channels: int, selector_mode: str | None = None
) -> Pipeline:
    """The channel-selector pipeline of ``params.pipeline`` for ``input_channels`` bands.

    Args:
        params: The run's params.
        input_channels: Bands of the data.
        selector_mode: ``hard`` / ``soft``; None: ``params.pipeline.selector_mode`` (``auto``
            there must be resolved first: the initialization state records the mode it chose).
    """
    from nodes.library.presets import build_channel_selector_pipeline

    pp = params.pipeline
    mode = selector_mode or pp.selector_mode
    if mode == "auto":
        raise ConfigError(
            "pipeline.selector_mode auto is resolved by Phase 1 (fit_statistics); build the "
            "pipeline with the mode its initialization state records"
        )
    return build_channel_selector_pipeline(
        input_channels=input_channels,
        n_select=pp.n_select,
        eps=pp.eps,
        temperature_init=pp.temperature_init,
        bce_weight=pp.bce_weight,
        normal_class_ids=pp.normal_class_ids,
        threshold=pp.threshold,
        name=pp.name,
        selector_mode=mode,
    )


def phase1_trainer(
    params: Params, pipeline: Pipeline, dm: Any, shard_runner: Any = None
) -> StatisticalTrainer:
    """The Phase-1 trainer of ``params.phase1`` over ``pipeline`` and the data module ``dm``.

    Args:
        params: The run's params.
        pipeline: The pipeline to fit.
        dm: Its data module.
        shard_runner: Where the passes run (:mod:`tasks.sharding`); None: in this process.
    """
    from nodes.training.statistical_trainer import StatisticalTrainer

    return StatisticalTrainer(
        pipeline,
        dm,
        normal_only=params.phase1.normal_only,
        sample_fraction=params.phase1.sample_fraction,
        seed=params.phase1.seed,
        shard_runner=shard_runner,
    )


def state_store_dir(ctx: RunContext) -> Path:
    """Where restored initialization states are checked out."""
    return resolve_path(ctx.params_path, ctx.params.dvc.states_dir)


def restore_state(ctx: RunContext, state_hash: str) -> Path:
    """Restore an initialization state by its DVC hash, verified; its directory."""
    from tasks.versioning import restore_init_state

    return restore_init_state(
        state_hash,
        root=Path(ctx.root),
        remote=ctx.params.dvc.remote,
        states_dir=state_store_dir(ctx),
    )


def version_store_dir(ctx: RunContext) -> Path:
    """Where restored data versions are checked out."""
    return resolve_path(ctx.params_path, ctx.params.dvc.versions_dir)


def restore_version(ctx: RunContext, version: str) -> Any:
    """Restore a data version by its DVC hash, verified."""
    from tasks.data_versions import restore_data_version

    return restore_data_version(
        version,
        root=Path(ctx.root),
        remote=ctx.params.dvc.remote,
        versions_dir=version_store_dir(ctx),
    )
