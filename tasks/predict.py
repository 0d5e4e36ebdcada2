"""Plain functions behind ``cubeline predict`` and ``cubeline phase1``: no flow run needed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.env import repo_root
from tasks.params import load_params, resolve_path

if TYPE_CHECKING:

    pass
from tasks.steps.data import build_pipeline, phase1_trainer


@dataclass(frozen=True)
class Prediction:
    """What ``predict_cubes`` wrote, and which registered version scored.

    Attributes:
        model_uri: ``models:/<name>/<version>``.
        version: The version that scored.
        files: Files written.
    """

    model_uri: str
    version: str
    files: list[Path]


def predict_cubes(
    params_path: str | Path, paths: Sequence[str | Path], out_dir: Path, alias: str = "champion"
) -> Prediction:
    """Score frames with ``models:/<registry.model_name>@<alias>``; write anomaly maps.

    For every frame: ``<file>_<index>.scores.npy`` (float32 RX scores), ``.decisions.npy``
    (bool, the calibrated decider) and ``anomaly_map_<file>_<index>.png``.

    Args:
        params_path: ``params.yaml`` (model name, tracking store, expected band count).
        paths: Frame files (``.mat``, ``.npz``, ``.cu3s``).
        out_dir: Output directory (created).
        alias: Registry alias to load.

    Returns:
        The version that scored and the files written.

    Raises:
        DataValidationError: A frame fails validation (nothing is written for any frame).
        RegistryError: The model has no such alias.
    """
    import io

    import numpy as np

    from nodes.data.readers import read_frames
    from tasks.env import atomic_write_bytes
    from tasks.pyfunc_model import score_cubes
    from tasks.serving import load_alias
    from tasks.tracking import configure_mlflow, write_anomaly_maps

    params = load_params(params_path)
    root = repo_root(Path(params_path).resolve().parent)
    # Validate every frame before writing anything.
    frames = [
        fr
        for p in paths
        for fr in read_frames(p, validate=True, expected_channels=params.data.expected_channels)
    ]
    configure_mlflow(params.mlflow.tracking_uri, root, experiment_name=params.mlflow.experiment)
    model = load_alias(params.registry.model_name, alias)
    decider = next((n for n in model.pipeline.node_list() if n.name == "decider"), None)
    threshold = getattr(decider, "threshold", None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fr in frames:
        name = f"{Path(fr.source).stem}_{fr.index}"
        pred = score_cubes(model.pipeline, fr.cube[None].astype(np.float32), model.outputs)
        scores = np.asarray(pred["scores"], dtype=np.float32)
        decisions = np.asarray(pred["decisions"])
        for key, arr in (("scores", scores), ("decisions", decisions)):
            buf = io.BytesIO()
            np.save(buf, arr[0], allow_pickle=False)
            # Through a temporary file and a rename: a link planted at the path is replaced,
            # not followed.
            written.append(atomic_write_bytes(out_dir / f"{name}.{key}.npy", buf.getvalue()))
        targets = fr.mask[None] if fr.labelled else None
        maps = write_anomaly_maps(
            scores,
            [name],
            out_dir,
            targets=targets,
            decisions=decisions,
            score_label="RX score (Mahalanobis², raw)",
            title_suffix=f"{model.uri}" + (f", threshold {float(threshold):.3g} logit"
                                           if threshold is not None else ""),
        )
        written.extend(maps.values())
    return Prediction(model.uri, model.version, written)


def phase1_report(params_path: str | Path) -> dict[str, Any]:
    """Fit Phase 1 on the training frames; per-frame AUC/AP of the RX scores of every frame.

    Returns:
        ``{"seconds", "pixels", "passes", "setup_seconds", "frames": [{"frame", "split",
        "anomaly_px", "auroc", "ap"}, ...]}``.
    """
    import numpy as np
    import torch

    from nodes.accumulators import BinnedCurve
    from nodes.data.datamodule import CubeDataModule
    from tasks.versioning import ensure_data

    params = load_params(params_path)
    d = params.data
    ensure_data(repo_root(Path(params_path).resolve().parent), d.dvc_file, params.dvc.remote)
    files = [resolve_path(params_path, p) for p in d.paths]
    start = time.perf_counter()
    dm = CubeDataModule(
        files,
        d.train_ids,
        d.val_ids,
        d.test_ids,
        batch_size=d.batch_size,
        expected_channels=d.expected_channels,
    )
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    mode = params.pipeline.selector_mode
    pipeline = build_pipeline(params, dm.num_channels, "soft" if mode == "auto" else mode)
    report = phase1_trainer(params, pipeline, dm).fit()
    split_of = {
        i: s
        for s, ids in (("test", d.test_ids), ("val", d.val_ids), ("train", d.train_ids))
        for i in ids
    }
    rows = []
    pipeline.eval()
    with torch.no_grad():
        for fid in sorted(split_of):
            fr = dm.get_frame(fid)
            out = pipeline.forward(
                {"cube": torch.from_numpy(np.ascontiguousarray(fr.cube[None]))},
                stage="inference",
                outputs=["rx.scores"],
            )
            s = out["rx.scores"][0].double().numpy()
            curve = BinnedCurve.from_samples(s, fr.mask)
            rows.append(
                {
                    "frame": Path(fr.source).name,
                    "split": split_of[fid],
                    "anomaly_px": int(fr.mask.sum()),
                    "auroc": curve.auroc(),
                    "ap": curve.average_precision(),
                }
            )
    return {
        "seconds": report.seconds,
        "pixels": report.pixels,
        "passes": report.passes,
        "setup_seconds": setup_s,
        "frames": rows,
    }
