"""Ready-made pipelines: the reference guide's channel-selector + RX example."""

from __future__ import annotations

from collections.abc import Sequence

from nodes.graph.pipeline import Pipeline
from nodes.library.data_node import AnomalyDataNode
from nodes.library.heads import BinaryDecider, ScoreToLogit
from nodes.library.losses import AnomalyBCEWithLogits
from nodes.library.metrics import AnomalyDetectionMetrics
from nodes.library.normalization import MinMaxNormalizer
from nodes.library.rx import RXGlobal
from nodes.library.selector import SoftChannelSelector


def build_channel_selector_pipeline(
    *,
    input_channels: int,
    n_select: int = 10,
    eps: float = 1e-6,
    temperature_init: float = 5.0,
    init_method: str = "variance",
    bce_weight: float = 10.0,
    pos_weight: float | None = None,
    normal_class_ids: Sequence[int] = (0,),
    threshold: float = 0.5,
    rx_score_dtype: str = "float32",
    name: str = "Channel_Selector",
    selector_mode: str = "hard",
) -> Pipeline:
    """Normalizer → soft channel selector → RX → logit head, with BCE loss and metrics.

    Node names: ``data``, ``normalizer``, ``selector``, ``rx``, ``logit_head``, ``decider``,
    ``bce``, ``metrics_anomaly``. RX scores in float32 by default: its inputs are a few
    normalized channels, where float32 loses nothing measurable and runs twice as fast (its
    statistics stay float64). ``selector_mode="soft"`` keeps all bands, re-weighted by the
    selector, and RX then fits all ``input_channels`` (see :mod:`nodes.library.selector`).
    """
    pipeline = Pipeline(name)
    data = AnomalyDataNode(normal_class_ids=list(normal_class_ids), name="data")
    normalizer = MinMaxNormalizer(eps=1e-6, use_running_stats=True, name="normalizer")
    selector = SoftChannelSelector(
        n_select=n_select, input_channels=input_channels, init_method=init_method,  # type: ignore[arg-type]
        temperature_init=temperature_init, mode=selector_mode, name="selector",  # type: ignore[arg-type]
    )
    rx = RXGlobal(num_channels=selector.out_channels, eps=eps, score_dtype=rx_score_dtype,
                  name="rx")
    head = ScoreToLogit(init_scale=1.0, init_bias=0.0, name="logit_head")
    decider = BinaryDecider(threshold=threshold, name="decider")
    bce = AnomalyBCEWithLogits(name="bce", weight=bce_weight, pos_weight=pos_weight)
    metrics = AnomalyDetectionMetrics(name="metrics_anomaly")
    pipeline.connect(
        (data.cube, normalizer.data),
        (normalizer.normalized, selector.data),
        (selector.selected, rx.data),
        (rx.scores, head.scores),
        (head.logits, bce.predictions),
        (data.mask, bce.targets),
        (head.logits, decider.logits),
        (decider.decisions, metrics.decisions),
        (data.mask, metrics.targets),
        (head.logits, metrics.logits),
    )
    return pipeline
