"""The cuvis-ai worker of ``bench/peers.py``: runs inside the cuvis-ai venv, never the project's.

Cubert's ``cuvis-ai`` (PyPI ``cuvis-ai``, on ``cuvis-ai-core`` and ``cuvis-ai-schemas``) with its
own nodes and trainers, as its documentation and sources show them:

- Phase 1: ``cuvis_ai_core.pipeline.pipeline.CuvisPipeline`` with ``cuvis_ai.node.data.
  AnomalyDataNode → cuvis_ai.node.normalization.MinMaxNormalizer → cuvis_ai.node.
  channel_selector.SoftChannelSelector(n_select=10, init_method="variance") → cuvis_ai.node.
  anomaly.rx_detector.RXGlobal(num_channels=10)``, fitted by ``cuvis_ai_core.training.
  StatisticalTrainer`` (one pass over the data per statistical node, in topological order).
  Its ``SoftChannelSelector`` re-weights all C channels instead of reducing them to
  ``n_select``, and its ``RXGlobal`` then silently widens its accumulator to C, so its RX is
  fitted on 61 channels where cubeline's is fitted on 10 (``rx_channels`` in the reply).
- RX scoring: ``RXGlobal(num_channels=C, eps=0)``, statistics from ``statistical_initialization``
  (untimed), ``forward(data=batch)`` under ``torch.no_grad``.
- Two-phase example: the same graph as ``nodes.library.presets.build_channel_selector_pipeline``
built
  from cuvis-ai's nodes (``ScoreToLogit``, ``BinaryDecider``, ``AnomalyBCEWithLogits``,
  ``AnomalyDetectionMetrics``), ``StatisticalTrainer.fit()``, ``unfreeze_nodes_by_name``,
  ``cuvis_ai_core.training.GradientTrainer`` with ``TrainingConfig(max_epochs=E,
  optimizer=adamw lr 1e-3, enable_checkpointing=False)`` on a ``LightningDataModule`` over the
  same arrays. None of this needs Cubert's native SDK (``cuvis`` / ``libcuvis.so``): the
  batches are plain tensors, not ``.cu3s`` sessions.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

import numpy as np
from peers import (
    PeerSide,
    batch_slices,
    measure,
    pick_metrics,
    serve,
    torch_gram,
)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


class CuvisWorker(PeerSide):
    """cuvis-ai's side of the protocol (see ``bench/peers.py``)."""

    def setup(self, data_dir: str, threads: int, batch_size: int) -> dict[str, Any]:
        """Load the cubes, pin threads, build the Phase-1 chain and fit the scoring RX."""
        import torch
        from cuvis_ai.node.anomaly.rx_detector import RXGlobal

        info, data = self.load(data_dir, threads, batch_size)
        self.cubes_t = torch.from_numpy(data.cubes)
        # cuvis-ai's data node takes an int mask of class ids (0 = normal) and wavelengths
        # per frame (B, C).
        self.masks_i = torch.from_numpy(data.masks.astype(np.int32))
        self.wl = torch.from_numpy(data.wavelengths.astype(np.int32))
        self.chain, self.names = self._chain()
        c = int(self.cubes_t.shape[-1])
        self.rx = RXGlobal(num_channels=c, eps=0.0, name="rx_score")
        self.rx.statistical_initialization(
            {"data": self.cubes_t[s]} for s in batch_slices(self.cubes_t.shape[0],
                                                             self.batch_size))
        self.rx.eval()
        try:
            import cuvis  # noqa: F401
            sdk = "importable"
        except Exception as exc:
            sdk = f"not importable ({type(exc).__name__}); not needed by the nodes run here"
        info.update(version=_version("cuvis-ai"), cuvis_ai_core=_version("cuvis-ai-core"),
                    cuvis_ai_schemas=_version("cuvis-ai-schemas"), cuvis_sdk=sdk)
        return info

    def _chain(self) -> tuple[Any, dict[str, str]]:
        from cuvis_ai.node.anomaly.rx_detector import RXGlobal
        from cuvis_ai.node.channel_selector import SoftChannelSelector
        from cuvis_ai.node.data import AnomalyDataNode
        from cuvis_ai.node.normalization import MinMaxNormalizer
        from cuvis_ai_core.pipeline.pipeline import CuvisPipeline

        c = int(self.cubes_t.shape[-1])
        p = CuvisPipeline("phase1")
        data = AnomalyDataNode(normal_class_ids=[0], name="data")
        norm = MinMaxNormalizer(eps=1e-6, use_running_stats=True, name="normalizer")
        sel = SoftChannelSelector(n_select=10, input_channels=c, init_method="variance",
                                  name="selector")
        rx = RXGlobal(num_channels=10, eps=1e-6, name="rx")
        p.connect((data.outputs.cube, norm.inputs.data),
                  (norm.outputs.normalized, sel.inputs.data),
                  (sel.outputs.selected, rx.inputs.data))
        self.nodes = {"normalizer": norm, "selector": sel, "rx": rx}
        return p, {"rx": rx.name}

    def _batch(self, s: slice) -> dict[str, Any]:
        n = s.stop - s.start
        return {"cube": self.cubes_t[s], "mask": self.masks_i[s],
                "wavelengths": self.wl.expand(n, -1)}

    def phase1(self) -> dict[str, Any]:
        """cuvis-ai's ``StatisticalTrainer.fit()`` from in-memory batches (views)."""
        from cuvis_ai_core.training import StatisticalTrainer

        batches = [self._batch(s) for s in batch_slices(self.cubes_t.shape[0],
                                                         self.batch_size)]

        class Mem:
            def setup(self, stage: str) -> None:
                pass

            def train_dataloader(self) -> list[dict[str, Any]]:
                return batches

        trainer = StatisticalTrainer(pipeline=self.chain, datamodule=Mem(),
                                     emit=lambda event: None)
        t, _ = measure(trainer.fit)
        rx, norm = self.nodes["rx"], self.nodes["normalizer"]
        return {**t, "passes": 3, "rx_channels": int(rx.mu.shape[0]),
                "normalizer_min": float(norm.running_min), "normalizer_max":
                float(norm.running_max),
                "note": "one data pass per statistical node (normalizer, selector, RX); its "
                        "selector keeps all 61 channels, so its RX fits 61 x 61"}

    def rx_score(self, write_scores: bool = False) -> dict[str, Any]:
        """``RXGlobal.forward`` on ``batch_size`` cubes per call (cached pseudo-inverse)."""
        import torch

        batches = [self.cubes_t[s] for s in batch_slices(self.cubes_t.shape[0],
                                                          self.batch_size)]

        def run() -> list[Any]:
            with torch.no_grad():
                return [self.rx.forward(data=b)["scores"] for b in batches]

        t, out = measure(run)
        if write_scores:
            assert self.data is not None
            np.save(self.data.out_dir / "scores_cuvis.npy", out[0][0, ..., 0].numpy())
        return {**t, "rx_channels": int(self.rx.mu.shape[0])}

    def gram_f64(self) -> dict[str, Any]:
        """float64 ``X^T X`` over all pixels (this venv's torch build)."""
        return torch_gram(self.cubes_t, self.batch_size)

    def two_phase(self, epochs: int, n_train: int) -> dict[str, Any]:
        """The guide's channel-selector example with cuvis-ai's nodes and trainers."""
        import pytorch_lightning as pl
        import torch
        from cuvis_ai.node.anomaly.rx_detector import RXGlobal
        from cuvis_ai.node.channel_selector import SoftChannelSelector
        from cuvis_ai.node.conversion import ScoreToLogit
        from cuvis_ai.node.data import AnomalyDataNode
        from cuvis_ai.node.deciders.binary_decider import BinaryDecider
        from cuvis_ai.node.losses import AnomalyBCEWithLogits
        from cuvis_ai.node.metrics import AnomalyDetectionMetrics
        from cuvis_ai.node.normalization import MinMaxNormalizer
        from cuvis_ai_core.pipeline.pipeline import CuvisPipeline
        from cuvis_ai_core.training import GradientTrainer, StatisticalTrainer
        from cuvis_ai_core.training.config import OptimizerConfig, TrainingConfig
        from torch.utils.data import DataLoader, Dataset

        assert self.data is not None
        cubes, masks, wl = self.cubes_t, self.masks_i, self.wl
        n = int(cubes.shape[0])
        c = int(cubes.shape[-1])
        bs = self.batch_size
        root = tempfile.mkdtemp(prefix="cuvis-2p-")

        class Frames(Dataset[dict[str, Any]]):
            def __init__(self, ids: list[int]) -> None:
                self.ids = ids

            def __len__(self) -> int:
                return len(self.ids)

            def __getitem__(self, i: int) -> dict[str, Any]:
                j = self.ids[i]
                return {"cube": cubes[j], "mask": masks[j], "wavelengths": wl}

        class DM(pl.LightningDataModule):
            def train_dataloader(self) -> DataLoader[dict[str, Any]]:
                g = torch.Generator().manual_seed(0)
                return DataLoader(Frames(list(range(n_train))), batch_size=bs, shuffle=True,
                                  generator=g, num_workers=0)

            def val_dataloader(self) -> DataLoader[dict[str, Any]]:
                return DataLoader(Frames(list(range(n_train, n))), batch_size=bs,
                                  num_workers=0)

        phases: dict[str, float] = {}

        def run() -> dict[str, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            p = CuvisPipeline("Channel_Selector")
            data = AnomalyDataNode(normal_class_ids=[0], name="data")
            norm = MinMaxNormalizer(eps=1e-6, use_running_stats=True, name="normalizer")
            sel = SoftChannelSelector(n_select=10, input_channels=c, init_method="variance",
                                      temperature_init=5.0, name="selector")
            rx = RXGlobal(num_channels=10, eps=1e-6, name="rx")
            head = ScoreToLogit(init_scale=1.0, init_bias=0.0, name="logit_head")
            decider = BinaryDecider(threshold=0.5, name="decider")
            bce = AnomalyBCEWithLogits(name="bce", weight=10.0)
            metrics = AnomalyDetectionMetrics(name="metrics_anomaly")
            # Ports named on both sides of a node (the data node's cube and mask) must be
            # spelt out as .inputs / .outputs in cuvis-ai.
            p.connect(
                (data.outputs.cube, norm.inputs.data),
                (norm.outputs.normalized, sel.inputs.data),
                (sel.outputs.selected, rx.inputs.data),
                (rx.outputs.scores, head.inputs.scores),
                (head.outputs.logits, bce.inputs.predictions),
                (data.outputs.mask, bce.inputs.targets),
                (head.outputs.logits, decider.inputs.logits),
                (decider.outputs.decisions, metrics.inputs.decisions),
                (data.outputs.mask, metrics.inputs.targets),
                (head.outputs.logits, metrics.inputs.logits),
            )
            dm = DM()
            StatisticalTrainer(pipeline=p, datamodule=dm, emit=lambda event: None).fit()
            t1, c1 = time.perf_counter(), time.process_time()
            p.unfreeze_nodes_by_name([sel.name, rx.name, head.name])
            cfg = TrainingConfig(
                seed=0, max_epochs=epochs, accelerator="cpu", devices=1,
                default_root_dir=root, enable_progress_bar=False, enable_checkpointing=False,
                num_sanity_val_steps=0,
                optimizer=OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0),
            )
            gt = GradientTrainer(pipeline=p, datamodule=dm, loss_nodes=[bce],
                                 metric_nodes=[metrics], training_config=cfg)
            gt.fit()
            phases.update(phase1_s=t1 - t0, phase2_s=time.perf_counter() - t1,
                          phase1_cpu_s=c1 - c0, phase2_cpu_s=time.process_time() - c1)
            assert gt.trainer is not None
            return {k: float(v) for k, v in gt.trainer.callback_metrics.items()
                    if getattr(v, "numel", lambda: 1)() == 1}

        t, metrics_out = measure(run)
        shutil.rmtree(root, ignore_errors=True)  # Lightning's logs/checkpoint dir
        keep = pick_metrics(metrics_out)
        return {**t, **phases, "epochs": epochs, "val_metrics": keep}


def main() -> None:
    """Serve requests from ``bench/peers.py`` on stdin."""
    w = CuvisWorker()
    serve({"setup": w.setup, "phase1": w.phase1, "rx_score": w.rx_score,
           "gram_f64": w.gram_f64, "two_phase": w.two_phase})


if __name__ == "__main__":
    main()
