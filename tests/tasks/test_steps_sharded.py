"""``fit_statistics`` with ``phase1.sharding.runner: dask``: Phase 1 sharded over a real local
Dask cluster (Prefect's DaskTaskRunner) gives the initialization state of the in-process fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nodes.training.init_state import load_init_state
from tasks.steps import RunContext, fit_statistics, load_cubes
from tasks.versioning import restore_init_state
from tests.flows.helpers import FAST_PARAMS, copy_repo, edit_params


def _fit(root: Path) -> dict[str, torch.Tensor]:
    from tasks.params import load_params
    from tasks.steps import build_pipeline

    ctx = RunContext(str(root / "params.yaml"), str(root))
    data = load_cubes.fn(ctx)
    init = fit_statistics.fn(ctx, data)
    state = restore_init_state(init.state_hash, root=root, remote=None,
                               states_dir=root / "outputs" / "restored")
    pipeline = build_pipeline(load_params(root / "params.yaml"), data.channels)
    load_init_state(pipeline, state)
    return {k: v.clone() for k, v in pipeline.state_dict().items()}


@pytest.mark.slow
def test_dask_sharded_fit_statistics_equals_in_process(tmp_path: Path) -> None:
    local = copy_repo(tmp_path / "local")
    edit_params(local, **FAST_PARAMS)
    sharded = copy_repo(tmp_path / "sharded")
    edit_params(sharded, **FAST_PARAMS,
                phase1={"sharding": {"runner": "dask", "address": None, "n_shards": 3}})
    a, b = _fit(local), _fit(sharded)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            x, y = a[key].double(), b[key].double()
            scale = max(float(x.abs().max()), 1e-300)
            assert float((x - y).abs().max()) <= 1e-10 * scale, key
        else:
            assert torch.equal(a[key], b[key]), key
