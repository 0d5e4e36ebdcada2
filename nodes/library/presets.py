"""Ready-made pipelines: the reference guide's channel-selector + RX example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nodes.graph.pipeline import Pipeline
from nodes.library.data_node import AnomalyDataNode
from nodes.library.heads import BinaryDecider, ScoreToLogit
from nodes.library.losses import AnomalyBCEWithLogits
from nodes.library.metrics import AnomalyDetectionMetrics
from nodes.library.normalization import MinMaxNormalizer
from nodes.library.rx import RXGlobal
from nodes.library.selector import SoftChannelSelector

#: Node names of :func:`build_channel_selector_pipeline`, and the output its decider thresholds.
LOSS_NODE = "bce"
METRIC_NODE = "metrics_anomaly"
SCORE_NODE = "logit_head"
SCORE_KEY = f"{SCORE_NODE}.logits"


@dataclass(frozen=True)
class PresetHandle:
    """Typed access to the parts of a channel-selector pipeline that training and scoring use.

    Attributes:
        pipeline: The pipeline.
        loss_nodes: Its loss nodes (the BCE loss).
        metric_nodes: Its metric nodes.
        score_key: The output (``"<node>.<port>"``) the decider thresholds: curves and maps use it.
    """

    pipeline: Pipeline
    loss_nodes: tuple[AnomalyBCEWithLogits, ...]
    metric_nodes: tuple[AnomalyDetectionMetrics, ...]
    score_key: str = SCORE_KEY

    @classmethod
    def of(cls, pipeline: Pipeline) -> PresetHandle:
        """The handle of a pipeline built by (or loaded from) the preset, checked by type.

        Raises:
            PipelineError: A node is missing or of another type.
        """
        pipeline.node(SCORE_NODE, ScoreToLogit)
        return cls(
            pipeline=pipeline,
            loss_nodes=(pipeline.node(LOSS_NODE, AnomalyBCEWithLogits),),
            metric_nodes=(pipeline.node(METRIC_NODE, AnomalyDetectionMetrics),),
        )


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
    if init_method not in ("variance", "uniform") or selector_mode not in ("hard", "soft"):
        raise ValueError(
            f"init_method must be 'variance' or 'uniform' (got {init_method!r}) and "
            f"selector_mode 'hard' or 'soft' (got {selector_mode!r})"
        )
    init: Literal["variance", "uniform"] = "uniform" if init_method == "uniform" else "variance"
    mode: Literal["hard", "soft"] = "soft" if selector_mode == "soft" else "hard"
    pipeline = Pipeline(name)
    data = AnomalyDataNode(normal_class_ids=list(normal_class_ids), name="data")
    normalizer = MinMaxNormalizer(eps=1e-6, use_running_stats=True, name="normalizer")
    selector = SoftChannelSelector(
        n_select=n_select, input_channels=input_channels, init_method=init,
        temperature_init=temperature_init, mode=mode, name="selector",
    )
    rx = RXGlobal(num_channels=selector.out_channels, eps=eps, score_dtype=rx_score_dtype,
                  name="rx")
    head = ScoreToLogit(init_scale=1.0, init_bias=0.0, name=SCORE_NODE)
    decider = BinaryDecider(threshold=threshold, name="decider")
    bce = AnomalyBCEWithLogits(name=LOSS_NODE, weight=bce_weight, pos_weight=pos_weight)
    metrics = AnomalyDetectionMetrics(name=METRIC_NODE)
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
