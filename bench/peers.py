"""Peer benchmark: cubeline vs Cubert's ``cuvis-ai`` vs Spectral Python, same cubes, same machine.

The same work in each tool, on seeded synthetic cubes (``bench/synthetic.py``'s ``make_cubes``)
written once to ``.npy`` files that every tool reads:

1. **Phase 1** of ``AnomalyDataNode → MinMaxNormalizer → SoftChannelSelector(n_select=10,
   variance) → RXGlobal`` at C = 61 (each tool's own ``StatisticalTrainer``). Spectral Python has
   no normalizer or selector: its Phase 1 is ``spectral.calc_stats`` (mean, covariance) plus the
   inverse covariance that ``spectral.rx`` uses, on the 61 bands.
2. **RX scoring** at C = 61: a global RX fitted (untimed, ridge 0: the textbook detector of
   Reed & Xiaoli 1990) on all cubes, then every cube scored in batches; the scores of cube 0 are
   compared across tools.
3. **The two-phase example** for a fixed number of epochs: Phase 1, unfreeze selector / RX /
   logit head, gradient training (AdamW, lr 1e-3, no checkpoints, no early stop) with a
   validation pass per epoch. Spectral Python has no gradient training (recorded as skipped).

Each tool runs in its own interpreter and environment (cubeline: this venv; the peers: their own
venvs, see ``bench/envs/setup_peers.sh``) as a long-lived worker process that this driver drives
over a line protocol, so one run measures all three on the same machine, and the repetitions
are interleaved (round r runs the tools in rotated order) so that load from other processes hits
them alike. Every worker is pinned to the same thread count (``torch.set_num_threads`` and the
BLAS/OpenMP variables). Timings: best of ``--repeats`` after one untimed warm-up, wall time
(``time.perf_counter``) and CPU time of the worker process (``time.process_time``).

A peer whose interpreter is missing (or that fails) is skipped and the reason recorded. Prints
each ratio (peer time / cubeline time, > 1 = cubeline faster), then one JSON object on the last
line.

Usage::

    .venv/bin/python bench/peers.py                  # 16 cubes of 256 x 256 x 61, 3 epochs
    .venv/bin/python bench/peers.py --quick          # tiny smoke run
    CUVIS_PYTHON=/path/bin/python SPECTRAL_PYTHON=/path/bin/python .venv/bin/python bench/peers.py

Workers: ``python bench/peers.py --worker cubeline|spectral`` and ``python bench/peers_cuvis.py``
(started by the driver; they read requests on stdin). This module imports only the standard
library and numpy at the top so that the Spectral Python venv can run its worker.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_CUVIS_PYTHON = "/work/peers/cuvis-venv/bin/python"
DEFAULT_SPECTRAL_PYTHON = "/work/peers/spectral-venv/bin/python"
TOOLS = ("cubeline", "cuvis-ai", "spectral")
OPS = ("gram_f64", "phase1", "rx_score", "two_phase")
TARGETS = {("phase1", "cuvis-ai"): 6.0, ("rx_score", "cuvis-ai"): 2.0,
           ("phase1", "spectral"): 10.0, ("rx_score", "spectral"): 10.0}
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


# =========================================================================== worker side
class Data:
    """The benchmark's cubes as every worker loads them (from the driver's ``.npy`` files)."""

    def __init__(self, data_dir: str) -> None:
        d = Path(data_dir)
        self.cubes: np.ndarray = np.load(d / "cubes.npy")          # (N, H, W, C) float32
        self.masks: np.ndarray = np.load(d / "masks.npy")          # (N, H, W) bool
        self.wavelengths: np.ndarray = np.load(d / "wavelengths.npy")  # (C,) int32
        self.out_dir = d

    @property
    def pixels(self) -> int:
        """Pixels of all cubes."""
        n, h, w, _ = self.cubes.shape
        return int(n * h * w)


def measure(fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Wall and process CPU seconds of one call of ``fn`` (after a garbage collection)."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu}, out


def pick_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The validation loss and detection metrics of a training run (for the record)."""
    words = ("auc", "average_precision", "/ap", "iou", "f1", "bce", "loss")
    return {k: round(float(v), 4) for k, v in sorted(metrics.items())
            if any(w in k.lower() for w in words) and not k.startswith("train")}


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches of frames."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def torch_gram(cubes: Any, batch_size: int) -> dict[str, Any]:
    """Reference op: float64 ``X^T X`` over all pixels, batch by batch (torch's BLAS).

    The GEMM bound of any exact covariance in this environment; shows whether two venvs'
    torch builds run the same kernels at the same speed.
    """
    import torch

    c = int(cubes.shape[-1])
    batches = [cubes[s] for s in batch_slices(int(cubes.shape[0]), batch_size)]

    def run() -> Any:
        acc = torch.zeros(c, c, dtype=torch.float64)
        for b in batches:
            x = b.reshape(-1, c).to(torch.float64)
            acc += x.T @ x
        return acc

    t, _ = measure(run)
    return t


def serve(handlers: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Answer JSON-line requests on stdin with JSON lines on the original stdout.

    Libraries print (Lightning, loguru); fd 1 is pointed at stderr (the worker's log) so that
    only replies reach the protocol pipe.
    """
    proto: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        try:
            res = handlers[op](**req)
            res["ok"] = True
        except Exception as exc:
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-4000:]}
        proto.write(json.dumps(res) + "\n")
        sys.stderr.flush()


def set_threads(threads: int) -> dict[str, Any]:
    """Pin torch's intra-op pool (if torch is here) and report the thread settings."""
    info: dict[str, Any] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",
                                                            "OPENBLAS_NUM_THREADS")}
    try:
        import torch
    except ImportError:
        return info
    torch.set_num_threads(threads)
    info["torch_num_threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    info["torch_cuda_build"] = torch.version.cuda
    return info


class PeerSide:
    """What every worker of the protocol holds: the shared cubes and the batch size."""

    def __init__(self) -> None:
        self.data: Data | None = None
        self.batch_size = 4

    def load(self, data_dir: str, threads: int, batch_size: int) -> tuple[dict[str, Any], Data]:
        """Pin the threads and load the cubes: the thread settings (for the reply), the cubes."""
        info = set_threads(threads)
        self.data = Data(data_dir)
        self.batch_size = batch_size
        return info, self.data


class CubelineWorker(PeerSide):
    """cubeline's side: ``nodes`` from this repository, in the project's venv."""

    def setup(self, data_dir: str, threads: int, batch_size: int) -> dict[str, Any]:
        """Load the cubes, pin threads, build the Phase-1 chain and the scoring RX."""
        import torch

        import nodes
        from nodes.training.stats import MomentState

        info, data = self.load(data_dir, threads, batch_size)
        self.cubes_t = torch.from_numpy(data.cubes)
        self.masks_t = torch.from_numpy(data.masks)
        self.chain = self._chain()
        c = self.cubes_t.shape[-1]
        moments = MomentState.from_samples(self.cubes_t.reshape(-1, c))
        self.rx = nodes.RXGlobal(num_channels=c, eps=0.0, name="rx_score")
        self.rx.fit_from_moments(moments)
        # The opt-in float64 scoring mode, timed alongside (not what the targets are judged on).
        self.rx64 = nodes.RXGlobal(num_channels=c, eps=0.0, score_dtype="float64",
                                   name="rx_score_f64")
        self.rx64.fit_from_moments(moments)
        info["version"] = _git_commit()
        return info

    def _chain(self) -> Any:
        from nodes import (
            AnomalyDataNode,
            MinMaxNormalizer,
            Pipeline,
            RXGlobal,
            SoftChannelSelector,
        )

        c = int(self.cubes_t.shape[-1])
        p = Pipeline("phase1")
        data = AnomalyDataNode(normal_class_ids=[0], name="data")
        norm = MinMaxNormalizer(eps=1e-6, use_running_stats=True, name="normalizer")
        sel = SoftChannelSelector(n_select=10, input_channels=c, init_method="variance",
                                  name="selector")
        rx = RXGlobal(num_channels=10, eps=1e-6, name="rx")
        p.connect((data.cube, norm.data), (norm.normalized, sel.data), (sel.selected, rx.data))
        return p

    def _batches(self) -> list[dict[str, Any]]:
        n = self.cubes_t.shape[0]
        return [{"cube": self.cubes_t[s], "mask": self.masks_t[s]}
                for s in batch_slices(n, self.batch_size)]

    def phase1(self) -> dict[str, Any]:
        """``StatisticalTrainer.fit()`` from in-memory batches (views, no copy)."""
        from nodes import StatisticalTrainer

        batches = self._batches()

        class Mem:
            def setup(self, stage: str) -> None:
                pass

            def train_dataloader(self) -> list[dict[str, Any]]:
                return batches

            val_dataloader = train_dataloader

        trainer = StatisticalTrainer(pipeline=self.chain, datamodule=Mem())
        t, report = measure(trainer.fit)
        rx = self.chain.nodes["rx"]
        norm = self.chain.nodes["normalizer"]
        return {**t, "passes": report.passes, "rx_channels": int(rx.mu.shape[0]),
                "normalizer_min": float(norm.running_min.min()),
                "normalizer_max": float(norm.running_max.max())}

    def rx_score(self, write_scores: bool = False) -> dict[str, Any]:
        """Score every cube, ``batch_size`` cubes per call, with the fitted C = 61 RX.

        Timed: the default ``RXGlobal`` (``score_dtype="auto"``: a float32 product of the
        float64 statistics for these float32 cubes). Then, timed separately and reported as
        ``float64_mode_*``, the same scoring with ``score_dtype="float64"``.
        """
        import torch

        batches = [self.cubes_t[s] for s in batch_slices(self.cubes_t.shape[0],
                                                          self.batch_size)]

        def scorer(rx: Any) -> Callable[[], list[Any]]:
            def run() -> list[Any]:
                with torch.no_grad():
                    return [rx(data=b)["scores"] for b in batches]
            return run

        t, out = measure(scorer(self.rx))
        t64, out64 = measure(scorer(self.rx64))
        if write_scores:
            assert self.data is not None
            np.save(self.data.out_dir / "scores_cubeline.npy", out[0][0].numpy())
            np.save(self.data.out_dir / "scores_cubeline_f64.npy", out64[0][0].numpy())
        return {**t, "float64_mode_wall": t64["wall"], "float64_mode_cpu": t64["cpu"],
                "score_dtype": self.rx.score_dtype, "rx_channels": int(self.rx.mu.shape[0])}

    def gram_f64(self) -> dict[str, Any]:
        """float64 ``X^T X`` over all pixels (torch)."""
        return torch_gram(self.cubes_t, self.batch_size)

    def two_phase(self, epochs: int, n_train: int) -> dict[str, Any]:
        """The preset channel-selector pipeline: Phase 1, unfreeze, ``GradientTrainer``."""
        import nodes
        from nodes.library.presets import build_channel_selector_pipeline

        assert self.data is not None
        n = self.data.cubes.shape[0]
        c = int(self.data.cubes.shape[-1])
        root = tempfile.mkdtemp(prefix="cubeline-2p-")
        phases: dict[str, float] = {}

        def run() -> dict[str, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            p = build_channel_selector_pipeline(input_channels=c)
            dm = nodes.CubeDataModule.from_arrays(
                self.data.cubes, self.data.masks, train_ids=list(range(n_train)),  # type: ignore[union-attr]
                val_ids=list(range(n_train, n)), test_ids=list(range(n_train, n)),
                batch_size=self.batch_size, wavelengths=self.data.wavelengths,  # type: ignore[union-attr]
            )
            nodes.StatisticalTrainer(pipeline=p, datamodule=dm).fit()
            t1, c1 = time.perf_counter(), time.process_time()
            p.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
            bce, metrics_node = p.nodes["bce"], p.nodes["metrics_anomaly"]
            assert isinstance(bce, nodes.Node)
            assert isinstance(metrics_node, nodes.AnomalyDetectionMetrics)
            gt = nodes.GradientTrainer(
                pipeline=p, datamodule=dm, loss_nodes=[bce], metric_nodes=[metrics_node],
                trainer_config=nodes.TrainerConfig(max_epochs=epochs, accelerator="cpu",
                                                   devices=1, default_root_dir=root),
                optimizer_config=nodes.OptimizerConfig(name="adamw", lr=1e-3),
                seed=0, threshold_method="none",
            )
            metrics = gt.fit()
            phases.update(phase1_s=t1 - t0, phase2_s=time.perf_counter() - t1,
                          phase1_cpu_s=c1 - c0, phase2_cpu_s=time.process_time() - c1)
            return metrics

        t, metrics = measure(run)
        shutil.rmtree(root, ignore_errors=True)  # Lightning's logs/checkpoint dir
        keep = pick_metrics(metrics)
        return {**t, **phases, "epochs": epochs, "val_metrics": keep}


class SpectralWorker(PeerSide):
    """Spectral Python's side: ``calc_stats`` + ``rx`` on numpy arrays (61 bands)."""

    def setup(self, data_dir: str, threads: int, batch_size: int) -> dict[str, Any]:
        """Load the cubes and fit the scoring statistics (untimed)."""
        import spectral

        info, data = self.load(data_dir, threads, batch_size)
        n, h, w, c = data.cubes.shape
        # All cubes as one tall image: a view, so calc_stats sees every pixel once.
        self.tall = data.cubes.reshape(n * h, w, c)
        self.stats = spectral.calc_stats(self.tall)
        _ = self.stats.inv_cov
        info.update(version=spectral.__version__, numpy=np.__version__)
        return info

    def phase1(self) -> dict[str, Any]:
        """Mean, covariance and inverse covariance of all pixels (no normalizer / selector)."""
        import spectral

        def run() -> Any:
            stats = spectral.calc_stats(self.tall)
            _ = stats.inv_cov  # what rx() needs: part of fitting the detector
            return stats

        t, stats = measure(run)
        return {**t, "passes": 1, "rx_channels": int(stats.mean.shape[0]),
                "note": "calc_stats + inv_cov on the 61 bands; Spectral Python has no "
                        "normalizer or channel selector"}

    def rx_score(self, write_scores: bool = False) -> dict[str, Any]:
        """``spectral.rx(batch, background=stats)`` on ``batch_size`` cubes per call."""
        import spectral

        assert self.data is not None
        cubes = self.data.cubes
        n, h, w, c = cubes.shape
        batches = [cubes[s].reshape(-1, w, c) for s in batch_slices(n, self.batch_size)]

        def run() -> list[np.ndarray]:
            return [spectral.rx(b, background=self.stats) for b in batches]

        t, out = measure(run)
        if write_scores:
            np.save(self.data.out_dir / "scores_spectral.npy", out[0][:h])
        return {**t, "rx_channels": int(c)}

    def gram_f64(self) -> dict[str, Any]:
        """float64 ``X^T X`` over all pixels (numpy's BLAS)."""
        assert self.data is not None
        cubes = self.data.cubes
        n, _, _, c = cubes.shape
        batches = [cubes[s] for s in batch_slices(n, self.batch_size)]

        def run() -> np.ndarray:
            acc = np.zeros((c, c))
            for b in batches:
                x = b.reshape(-1, c).astype(np.float64)
                acc += x.T @ x
            return acc

        t, _ = measure(run)
        return t

    def two_phase(self, epochs: int, n_train: int) -> dict[str, Any]:
        """Not available in Spectral Python."""
        return {"skipped": "Spectral Python has no gradient training (no trainable selector, "
                           "RX or logit head)"}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_worker(kind: str) -> None:
    """Entry of ``--worker``: serve the named tool's handlers."""
    worker: CubelineWorker | SpectralWorker = (
        CubelineWorker() if kind == "cubeline" else SpectralWorker()
    )
    serve({"setup": worker.setup, "phase1": worker.phase1, "rx_score": worker.rx_score,
           "gram_f64": worker.gram_f64, "two_phase": worker.two_phase})


# =========================================================================== driver side
class Worker:
    """A tool's worker process and its request/reply pipe."""

    def __init__(self, tool: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.tool, self.log = tool, log
        self._log_fh = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log_fh, text=True, env=env, cwd=str(REPO),
                                     bufsize=1)

    def call(self, op: str, timeout: float = 1800.0, **kw: Any) -> dict[str, Any]:
        """Send one request, wait for its reply (or the worker's death / the timeout)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"ok": False, "error": f"worker exited (rc {self.proc.poll()}); see {self.log}"}
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            return {"ok": False, "error": f"no reply to {op!r} within {timeout:.0f} s; killed"}
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "error": f"worker exited (rc {self.proc.wait()}); "
                                          f"log tail: {self.log_tail()}"}
        return dict(json.loads(line))

    def log_tail(self, n: int = 1500) -> str:
        """The end of the worker's stderr log."""
        self._log_fh.flush()
        return self.log.read_text(errors="replace")[-n:]

    def close(self) -> None:
        """Ask the worker to quit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log_fh.close()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, load."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "mem_gb": mem_gb,
            "os": platform.platform(), "python": platform.python_version()}


def write_data(d: Path, n: int, size: int, channels: int, seed: int) -> dict[str, Any]:
    """Generate the seeded cubes once and write them where every worker reads them."""
    from synthetic import make_cubes

    cubes, masks = make_cubes(n, size=size, channels=channels, seed=seed)
    np.save(d / "cubes.npy", cubes)
    np.save(d / "masks.npy", masks)
    np.save(d / "wavelengths.npy", np.linspace(450, 950, channels).round().astype(np.int32))
    return {"n_cubes": n, "size": size, "channels": channels, "seed": seed,
            "pixels": int(n * size * size), "anomaly_fraction": round(float(masks.mean()), 5),
            "generator": "bench/synthetic.py make_cubes"}


def start_workers(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Worker],
                                                                 dict[str, str]]:
    """Start every tool whose interpreter exists; the others are recorded as skipped."""
    env = {**os.environ, **TELEMETRY_OFF, **{k: str(args.threads) for k in THREAD_VARS}}
    env.pop("PYTHONPATH", None)
    argv = {
        "cubeline": [sys.executable, str(BENCH / "peers.py"), "--worker", "cubeline"],
        "cuvis-ai": [args.cuvis_python, str(BENCH / "peers_cuvis.py")],
        "spectral": [args.spectral_python, str(BENCH / "peers.py"), "--worker", "spectral"],
    }
    workers: dict[str, Worker] = {}
    skipped: dict[str, str] = {}
    for tool in TOOLS:
        if tool in args.skip:
            skipped[tool] = "skipped by --skip"
            continue
        py = argv[tool][0]
        if not Path(py).is_file():
            skipped[tool] = (f"interpreter {py} not found: run bench/envs/setup_peers.sh or "
                             f"pass --{tool.split('-')[0]}-python")
            continue
        workers[tool] = Worker(tool, argv[tool], env, tmp / f"worker-{tool}.log")
    return workers, skipped


def best(rows: list[dict[str, Any]], key: str) -> float | None:
    """Smallest value of ``key`` among the successful rows."""
    vals = [r[key] for r in rows if r.get("ok") and key in r]
    return min(vals) if vals else None


def run_op(workers: dict[str, Worker], op: str, repeats: int, warmup_kw: dict[str, Any],
           kw: dict[str, Any], failed: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """One untimed warm-up per tool, then ``repeats`` interleaved rounds (rotated order)."""
    tools = [t for t in workers if t not in failed]
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    for rnd in range(-1, repeats):
        order = tools[rnd % len(tools):] + tools[:rnd % len(tools)] if tools else []
        for tool in order:
            if tool in failed:
                continue
            res = workers[tool].call(op, **(warmup_kw if rnd < 0 else kw))
            if not res.get("ok"):
                failed[tool] = f"{op}: {res.get('error')}"
                print(f"  {tool:9s} {op}: FAILED {res.get('error')}", flush=True)
                tb = res.get("traceback")
                if tb:
                    print("    " + tb.strip().splitlines()[-1], flush=True)
                continue
            if "skipped" in res:  # the tool cannot do this task: record it once
                rows[tool] = [res]
                continue
            if rnd >= 0:
                rows[tool].append(res)
                print(f"  {tool:9s} {op} round {rnd + 1}: wall {res['wall']:.3f} s, "
                      f"cpu {res['cpu']:.3f} s", flush=True)
    return rows


def summarize(op: str, rows: dict[str, list[dict[str, Any]]], pixels: int,
              failed: dict[str, str], skipped: dict[str, str]) -> dict[str, Any]:
    """Best times, throughput and the ratios peer / cubeline for one task."""
    out: dict[str, Any] = {}
    for tool in TOOLS:
        r = rows.get(tool, [])
        if tool in skipped:
            out[tool] = {"skipped": skipped[tool]}
        elif r and "skipped" in r[0]:
            out[tool] = {"skipped": r[0]["skipped"]}
        elif tool in failed and not any(x.get("ok") for x in r):
            out[tool] = {"failed": failed[tool]}
        elif r:
            wall, cpu = best(r, "wall"), best(r, "cpu")
            entry: dict[str, Any] = {"best_wall_s": round(wall, 4) if wall else None,
                                     "best_cpu_s": round(cpu, 4) if cpu else None,
                                     "walls_s": [round(x["wall"], 4) for x in r],
                                     "cpus_s": [round(x["cpu"], 4) for x in r]}
            if op != "two_phase" and wall:
                entry["mpix_s"] = round(pixels / wall / 1e6, 2)
            extra = {k: v for k, v in r[-1].items()
                     if k not in ("wall", "cpu", "ok")}
            for k in ("phase1_s", "phase2_s", "phase1_cpu_s", "phase2_cpu_s",
                      "float64_mode_wall", "float64_mode_cpu"):
                if k in extra:
                    extra[f"best_{k}"] = round(min(x[k] for x in r), 4)
                    extra.pop(k)
            entry.update(extra)
            out[tool] = entry
    ours = out.get("cubeline", {})
    ratios: dict[str, Any] = {}
    for peer in ("cuvis-ai", "spectral"):
        theirs = out.get(peer, {})
        for clock in ("wall", "cpu"):
            a, b = ours.get(f"best_{clock}_s"), theirs.get(f"best_{clock}_s")
            if a and b:
                ratios[f"{peer}_over_cubeline_{clock}"] = round(b / a, 2)
            a = ours.get(f"best_float64_mode_{clock}")
            if a and b:
                ratios[f"{peer}_over_cubeline_float64_mode_{clock}"] = round(b / a, 2)
        target = TARGETS.get((op, peer))
        if target is not None and f"{peer}_over_cubeline_wall" in ratios:
            ratios[f"{peer}_target"] = target
            ratios[f"{peer}_target_met"] = bool(
                ratios[f"{peer}_over_cubeline_wall"] >= target
                and ratios.get(f"{peer}_over_cubeline_cpu", target) >= target)
    out["ratios"] = ratios
    return out


def compare_scores(tmp: Path) -> dict[str, Any]:
    """Max relative difference of cube 0's RX scores of each peer vs cubeline's."""
    ref_path = tmp / "scores_cubeline.npy"
    if not ref_path.is_file():
        return {}
    ref = np.load(ref_path).astype(np.float64).reshape(-1)
    out: dict[str, Any] = {}
    for name in ("cuvis-ai", "spectral"):
        p = tmp / f"scores_{name.split('-')[0]}.npy"
        if p.is_file():
            other = np.load(p).astype(np.float64).reshape(-1)
            rel = np.abs(other - ref) / np.maximum(np.abs(ref), 1e-12)
            out[f"{name}_vs_cubeline_median_rel"] = float(np.median(rel))
            out[f"{name}_vs_cubeline_p99_rel"] = float(np.quantile(rel, 0.99))
    p64 = tmp / "scores_cubeline_f64.npy"
    if p64.is_file():  # cubeline's default (float32 product) vs its float64 scoring mode
        exact = np.load(p64).astype(np.float64).reshape(-1)
        rel = np.abs(ref - exact) / np.maximum(np.abs(exact), 1e-12)
        out["cubeline_default_vs_float64_mode_max_rel"] = float(rel.max())
    return out


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    """Driver: data, workers, three tasks, ratios, JSON."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=("cubeline", "spectral"), help=argparse.SUPPRESS)
    ap.add_argument("--n-cubes", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--channels", type=int, default=61)
    ap.add_argument("--batch-size", type=int, default=4, help="cubes per batch (all tools)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="Phase-2 epochs of the two-phase run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cuvis-python",
                    default=os.environ.get("CUVIS_PYTHON", DEFAULT_CUVIS_PYTHON))
    ap.add_argument("--spectral-python",
                    default=os.environ.get("SPECTRAL_PYTHON", DEFAULT_SPECTRAL_PYTHON))
    ap.add_argument("--skip", nargs="*", default=[], choices=TOOLS, help="tools to leave out")
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    ap.add_argument("--quick", action="store_true", help="4 cubes of 64 x 64, 1 epoch, 1 round")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (data, worker logs)")
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    if args.quick:
        args.n_cubes, args.size, args.epochs, args.repeats = 4, 64, 1, 1
    n_train = max(1, args.n_cubes * 3 // 4)

    tmp = Path(tempfile.mkdtemp(prefix="cubeline-peers-"))
    result: dict[str, Any] = {"bench": "peers", "machine": machine_info(),
                              "loadavg_start": loadavg(), "threads": args.threads,
                              "batch_size": args.batch_size, "repeats": args.repeats,
                              "commit": _git_commit()}
    t_start = time.perf_counter()
    result["data"] = write_data(tmp, args.n_cubes, args.size, args.channels, seed=0)
    pixels = result["data"]["pixels"]
    print(f"data: {args.n_cubes} cubes of {args.size} x {args.size} x {args.channels} "
          f"({pixels / 1e6:.2f} Mpix) in {tmp}", flush=True)
    workers, skipped = start_workers(args, tmp)
    failed: dict[str, str] = {}
    tools_info: dict[str, Any] = {}
    try:
        for tool, w in workers.items():
            res = w.call("setup", timeout=900, data_dir=str(tmp), threads=args.threads,
                         batch_size=args.batch_size)
            if not res.get("ok"):
                failed[tool] = f"setup: {res.get('error')}"
                print(f"  {tool}: setup FAILED {res.get('error')}\n{w.log_tail()}", flush=True)
                continue
            res.pop("ok", None)
            tools_info[tool] = res
            print(f"  {tool}: ready {res}", flush=True)
        result["tools"] = tools_info
        tasks: dict[str, Any] = {}
        for op in args.ops:
            print(f"== {op}", flush=True)
            kw: dict[str, Any] = {}
            warm: dict[str, Any] = {}
            if op == "two_phase":
                kw = {"epochs": args.epochs, "n_train": n_train}
                warm = {"epochs": 1, "n_train": n_train}
            if op == "rx_score":
                warm = {"write_scores": True}
            rows = run_op(workers, op, args.repeats, warm, kw, failed)
            tasks[op] = summarize(op, rows, pixels, failed, skipped)
            if op == "rx_score":
                tasks[op]["score_agreement_cube0"] = compare_scores(tmp)
            for name, ratio in tasks[op]["ratios"].items():
                print(f"  ratio {op} {name}: {ratio}", flush=True)
        result["tasks"] = tasks
    finally:
        for w in workers.values():
            w.close()
    result["skipped"] = skipped
    result["failed"] = failed
    result["two_phase_split"] = {"train_cubes": n_train, "val_cubes": args.n_cubes - n_train,
                                 "epochs": args.epochs}
    result["loadavg_end"] = loadavg()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    summary: dict[str, Any] = {}
    for op, task in result.get("tasks", {}).items():
        for k, v in task["ratios"].items():
            summary[f"{op}.{k}"] = v
    result["ratios"] = summary
    if args.keep or failed:
        result["workdir"] = str(tmp)  # the worker logs say why a tool failed
    else:
        for p in sorted(tmp.iterdir()):
            p.unlink()
        tmp.rmdir()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
