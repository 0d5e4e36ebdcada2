"""The reference guide's pipeline and paths, shared by the guide tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nodes import (
    AnomalyBCEWithLogits,
    AnomalyDataNode,
    AnomalyDetectionMetrics,
    BinaryDecider,
    MinMaxNormalizer,
    Pipeline,
    RXGlobal,
    ScoreToLogit,
    SoftChannelSelector,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
GUIDE = REPO_ROOT.parent / "shared" / "reference" / "two-phase-training.md"
SESSION = REPO_ROOT / "data" / "session"
#: The bundled session's band count (the guide's examples have 61).
BANDS = 205


def build_guide_pipeline(normal_class_ids: Sequence[int] = (0,)) -> Pipeline:
    """The graph of the guide's "Complete Two-Phase Example" (input_channels 61 -> 205).

    Nodes are left unnamed, as in the guide: they take the default names the guide looks up
    (``data``, ``normalizer``, ``selector``, ``rx_detector``, ``logit_head``, ``decider``).
    """
    pipeline = Pipeline("Channel_Selector")
    data_node = AnomalyDataNode(normal_class_ids=list(normal_class_ids))
    normalizer = MinMaxNormalizer(eps=1e-6, use_running_stats=True)
    selector = SoftChannelSelector(n_select=10, input_channels=BANDS, init_method="variance")
    rx_node = RXGlobal(num_channels=10, eps=1e-6)
    logit_head = ScoreToLogit(init_scale=1.0, init_bias=0.0)
    decider = BinaryDecider(threshold=0.5)
    bce_loss = AnomalyBCEWithLogits(name="bce", weight=10.0)
    metrics_node = AnomalyDetectionMetrics(name="metrics_anomaly")
    pipeline.connect(
        (data_node.cube, normalizer.data),
        (normalizer.normalized, selector.data),
        (selector.selected, rx_node.data),
        (rx_node.scores, logit_head.scores),
        (logit_head.logits, bce_loss.predictions),
        (data_node.mask, bce_loss.targets),
        (logit_head.logits, decider.logits),
        (decider.decisions, metrics_node.decisions),
        (data_node.mask, metrics_node.targets),
    )
    return pipeline
