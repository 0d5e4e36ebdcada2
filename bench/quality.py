"""Detection quality of the two phases across splits and frame orders (the bundled session).

The reference guide's channel-selector example, trained as the flows train it (``params.yaml``:
the ``pipeline`` knobs, ``phase1.normal_only``, the ``phase2`` optimizer / scheduler / trainer /
callbacks, the ``threshold`` calibration), on four splits of the five ABU scenes

    A: train airport-1..3           val urban-4   test urban-5
    B: train airport-1, -2, urban-4  val airport-3  test urban-5
    C: train airport-1..3           val urban-5   test urban-4
    D: train airport-1, -2, urban-4  val urban-5   test airport-3

and six seeds per split. A seed changes only the order of the training frames (the shuffle of
``CubeDataModule``); Phase 1 does not depend on it, so it runs once per split. For every run:
the test AUROC, AP and F1 (at the decision threshold calibrated on the validation frame) after
Phase 1 and after Phase 2, and what Phase 2 handed back (``GradientTrainer.report``). Per split:
means and sample standard deviations over the seeds, and the number of runs where Phase 2 ends
below Phase 1 on test AP (at all, and by more than 0.01).

There is no cuvis-ai environment on this machine; ``--cuvis-python`` is recorded as skipped
(the like-for-like peer comparison is ``bench/peers.py``'s, which needs that environment).

Prints one line per run, then one JSON object on the last line: per split ``phase1_ap_mean``,
``phase2_ap_mean``, ``phase2_auroc_mean``, ``phase2_auroc_sd``, ``phase2_below_phase1_runs``
(and more), plus ``"meta"`` (machine, load average, selector mode, settings).

    .venv/bin/python bench/quality.py                       # params.yaml as it is
    .venv/bin/python bench/quality.py --selector-mode hard  # the other reading of the selector
    .venv/bin/python bench/quality.py --jobs 8              # runs in 8 processes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]

SCENES = ("airport-1", "airport-2", "airport-3", "urban-4", "urban-5")
#: split -> (train ids, val ids, test ids), ids into SCENES.
SPLITS: dict[str, tuple[list[int], list[int], list[int]]] = {
    "A": ([0, 1, 2], [3], [4]),
    "B": ([0, 1, 3], [2], [4]),
    "C": ([0, 1, 2], [4], [3]),
    "D": ([0, 1, 3], [4], [2]),
}
KEYS = ("auroc", "ap", "f1")


def load_settings(params_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The sections of ``params.yaml`` that a training run reads, with ``overrides`` applied."""
    import yaml

    doc = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    settings = {
        "pipeline": dict(doc.get("pipeline") or {}),
        "phase1": dict(doc.get("phase1") or {}),
        "phase2": dict(doc.get("phase2") or {}),
        "threshold": dict(doc.get("threshold") or {}),
    }
    for dotted, value in overrides.items():
        node = settings
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return settings


def _pick(metrics: dict[str, float], stage: str) -> dict[str, float]:
    out = {}
    for key in KEYS:
        value = metrics.get(f"{stage}/metrics_anomaly/{key}", metrics.get(f"metrics_anomaly/{key}"))
        out[key] = float("nan") if value is None else float(value)
    return out


def run_split(split: str, seeds: list[int], settings: dict[str, Any], epochs: int | None,
              threads: int) -> list[dict[str, Any]]:
    """Phase 1 once for ``split``, then Phase 2 once per seed; one result dict per seed."""
    import torch

    torch.set_num_threads(threads)
    from nodes import AnomalyDetectionMetrics, GradientTrainer, Node, StatisticalTrainer
    from nodes.data import CubeDataModule
    from nodes.library.presets import build_channel_selector_pipeline
    from nodes.training.config import TrainingConfig

    pcfg, p1cfg, thr = settings["pipeline"], settings["phase1"], settings["threshold"]
    paths = [ROOT / "data" / "session" / f"abu-{s}.mat" for s in SCENES]
    train, val, test = SPLITS[split]
    training = TrainingConfig.from_dict(settings["phase2"])
    trainer_cfg = training.trainer
    if epochs is not None:
        trainer_cfg = trainer_cfg.replace(max_epochs=epochs)

    def datamodule(seed: int) -> CubeDataModule:
        return CubeDataModule(paths, train_ids=train, val_ids=val, test_ids=test,
                              batch_size=1, seed=seed)

    pipe = build_channel_selector_pipeline(
        input_channels=205, n_select=int(pcfg.get("n_select", 10)),
        eps=float(pcfg.get("eps", 1e-6)), temperature_init=float(pcfg.get("temperature_init", 5.0)),
        bce_weight=float(pcfg.get("bce_weight", 10.0)),
        normal_class_ids=tuple(pcfg.get("normal_class_ids", (0,))),
        selector_mode=str(pcfg.get("selector_mode", "hard")),
    )
    t0 = time.perf_counter()
    dm = datamodule(0)
    StatisticalTrainer(pipeline=pipe, datamodule=dm,
                       normal_only=bool(p1cfg.get("normal_only", True))).fit()
    phase1_s = time.perf_counter() - t0
    losses = [cast(Node, pipe.nodes["bce"])]
    metrics = [cast(AnomalyDetectionMetrics, pipe.nodes["metrics_anomaly"])]
    work = Path(tempfile.mkdtemp(prefix=f"cubeline-quality-{split}-"))
    results: list[dict[str, Any]] = []
    try:
        # Phase 1 alone, at a threshold calibrated on the validation frame like Phase 2's.
        bare = TrainingConfig().trainer.replace(accelerator="cpu", enable_progress_bar=False,
                                                default_root_dir=str(work / "p1"))
        GradientTrainer(pipe, dm, losses, metrics, bare,
                        threshold_method=thr.get("method", "fpr"),
                        target_fpr=float(thr.get("target_fpr", 0.01))).calibrate_threshold()
        phase1 = _pick(GradientTrainer(pipe, dm, losses, metrics, bare).test(), "test")
        for seed in seeds:
            run = copy.deepcopy(pipe)
            run.unfreeze_nodes_by_name(list(pcfg.get("unfreeze", ["selector", "rx",
                                                                  "logit_head"])))
            cfg = trainer_cfg.replace(default_root_dir=str(work / f"seed{seed}"),
                                      enable_progress_bar=False)
            dm_seed = datamodule(seed)
            gt = GradientTrainer(
                run, dm_seed, [cast(Node, run.nodes["bce"])],
                [cast(AnomalyDetectionMetrics, run.nodes["metrics_anomaly"])], cfg,
                training.optimizer, training.scheduler, seed=seed,
                threshold_method=thr.get("method", "fpr"),
                target_fpr=float(thr.get("target_fpr", 0.01)),
            )
            t0 = time.perf_counter()
            gt.fit()
            seconds = time.perf_counter() - t0
            phase2 = _pick(gt.test(), "test")
            report = gt.report
            results.append({
                "split": split, "seed": seed,
                "phase1": {k: round(v, 4) for k, v in phase1.items()},
                "phase2": {k: round(v, 4) for k, v in phase2.items()},
                "kept_phase1": bool(report.kept_phase1) if report else None,
                "best_epoch": report.best_epoch if report else None,
                "epochs_run": report.epochs_run if report else None,
                "phase1_s": round(phase1_s, 2), "phase2_s": round(seconds, 2),
            })
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per split: means, sample sds and the Phase-2-below-Phase-1 counts."""
    out: dict[str, Any] = {}
    for split in sorted({r["split"] for r in runs}):
        rows = [r for r in runs if r["split"] == split]
        p1 = {k: [r["phase1"][k] for r in rows] for k in KEYS}
        p2 = {k: [r["phase2"][k] for r in rows] for k in KEYS}
        diff = [b - a for a, b in zip(p1["ap"], p2["ap"], strict=True)]
        out[split] = {
            "phase1_ap_mean": round(statistics.mean(p1["ap"]), 4),
            "phase2_ap_mean": round(statistics.mean(p2["ap"]), 4),
            "phase2_auroc_mean": round(statistics.mean(p2["auroc"]), 4),
            "phase2_auroc_sd": round(_sd(p2["auroc"]), 4),
            "phase2_below_phase1_runs": sum(d < 0 for d in diff),
            "phase2_below_phase1_by_0.01_runs": sum(d < -0.01 for d in diff),
            "phase1_auroc_mean": round(statistics.mean(p1["auroc"]), 4),
            "phase1_f1_mean": round(statistics.mean(p1["f1"]), 4),
            "phase2_ap_sd": round(_sd(p2["ap"]), 4),
            "phase2_f1_mean": round(statistics.mean(p2["f1"]), 4),
            "phase2_f1_sd": round(_sd(p2["f1"]), 4),
            "phase2_ap_min_minus_phase1": round(min(diff), 4),
            "kept_phase1_runs": sum(bool(r["kept_phase1"]) for r in rows),
            "runs": len(rows),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--splits", default="A,B,C,D")
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--epochs", type=int, default=None, help="override phase2.trainer.max_epochs")
    ap.add_argument("--selector-mode", choices=["hard", "soft"], default=None,
                    help="override pipeline.selector_mode")
    ap.add_argument("--set", action="append", default=[], metavar="DOTTED=JSON",
                    help="override a setting, e.g. phase2.optimizer.lr=0.01")
    ap.add_argument("--jobs", type=int, default=1, help="runs in this many processes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process (default: all cores / jobs)")
    ap.add_argument("--cuvis-python", default=os.environ.get("CUVIS_PYTHON"),
                    help="python of a cuvis-ai environment (not supported here: recorded)")
    args = ap.parse_args()

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        overrides[key] = json.loads(raw)
    if args.selector_mode:
        overrides["pipeline.selector_mode"] = args.selector_mode
    settings = load_settings(args.params, overrides)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if jobs == 1:
        for split in splits:
            runs += run_split(split, seeds, settings, args.epochs, threads)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_split, split, [seed], settings, args.epochs, threads)
                       for split in splits for seed in seeds]
            for fut in futures:
                runs += fut.result()
    summary = summarize(runs)
    from tasks.env import cpu_model

    cuvis = ("skipped: no cuvis-ai environment given" if not args.cuvis_python else
             f"skipped: {args.cuvis_python} given, but the cuvis-ai quality worker is not "
             "built (see bench/peers.py for the like-for-like timing comparison)")
    summary["meta"] = {
        "machine": f"{cpu_model()}, {os.cpu_count()} vCPU",
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "jobs": jobs, "threads_per_job": threads,
        "selector_mode": settings["pipeline"].get("selector_mode", "hard"),
        "phase2": settings["phase2"], "overrides": overrides,
        "epochs": args.epochs, "seconds": round(time.perf_counter() - start, 1),
        "cuvis_ai": cuvis,
        "done_when": {
            split: {
                "phase2_ap_mean_ge_phase1": s["phase2_ap_mean"] >= s["phase1_ap_mean"],
                "no_run_below_by_0.01": s["phase2_below_phase1_by_0.01_runs"] == 0,
                "auroc_sd_le_0.02": not math.isnan(s["phase2_auroc_sd"])
                and s["phase2_auroc_sd"] <= 0.02,
            } for split, s in summary.items() if split != "meta"
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
