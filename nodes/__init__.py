"""cubeline's model layer: typed-port nodes, the pipeline graph and the two training phases.

Pure PyTorch + Lightning + pydantic + pandera; never imports prefect, mlflow or dvc.
"""

from nodes.base import Node
from nodes.data_node import AnomalyDataNode
from nodes.errors import (
    ConfigError,
    CubelineError,
    DataValidationError,
    NotInitializedError,
    PipelineError,
    PortConnectionError,
    TrainingError,
)
from nodes.heads import BinaryDecider, ScoreToLogit
from nodes.losses import AnomalyBCEWithLogits
from nodes.metrics import AnomalyDetectionMetrics
from nodes.normalization import MinMaxNormalizer
from nodes.pca import TrainablePCA
from nodes.pipeline import Pipeline, PipelineMetadata
from nodes.ports import PortSpec
from nodes.registry import NODE_REGISTRY, register_node
from nodes.rx import RXGlobal
from nodes.selector import SoftChannelSelector
from nodes.statistical_trainer import FitReport, StatisticalTrainer

__all__ = [
    "NODE_REGISTRY",
    "AnomalyBCEWithLogits",
    "AnomalyDataNode",
    "AnomalyDetectionMetrics",
    "BinaryDecider",
    "ConfigError",
    "CubelineError",
    "DataValidationError",
    "FitReport",
    "MinMaxNormalizer",
    "Node",
    "NotInitializedError",
    "Pipeline",
    "PipelineError",
    "PipelineMetadata",
    "PortConnectionError",
    "PortSpec",
    "RXGlobal",
    "ScoreToLogit",
    "SoftChannelSelector",
    "StatisticalTrainer",
    "TrainablePCA",
    "TrainingError",
    "register_node",
]
