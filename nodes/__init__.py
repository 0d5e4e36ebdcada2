"""cubeline's model layer: typed-port nodes, the pipeline graph and the two training phases.

Pure PyTorch + Lightning + pydantic + pandera; never imports prefect, mlflow or dvc.
Names that pull in Lightning (trainers of Phase 2, data modules) load on first use, so
``import nodes`` stays cheap for command-line tools.
"""

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from nodes.config import (
        CallbacksConfig,
        EarlyStoppingConfig,
        LearningRateMonitorConfig,
        ModelCheckpointConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainerConfig,
        TrainingConfig,
    )
    from nodes.data import CubeDataModule, SingleCu3sDataModule
    from nodes.gradient_trainer import GradientTrainer

_LAZY = {
    "GradientTrainer": "nodes.gradient_trainer",
    "CubeDataModule": "nodes.data",
    "SingleCu3sDataModule": "nodes.data",
    **dict.fromkeys(
        [
            "CallbacksConfig",
            "EarlyStoppingConfig",
            "LearningRateMonitorConfig",
            "ModelCheckpointConfig",
            "OptimizerConfig",
            "SchedulerConfig",
            "TrainerConfig",
            "TrainingConfig",
        ],
        "nodes.config",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nodes' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "NODE_REGISTRY",
    "AnomalyBCEWithLogits",
    "AnomalyDataNode",
    "AnomalyDetectionMetrics",
    "BinaryDecider",
    "CallbacksConfig",
    "ConfigError",
    "CubeDataModule",
    "CubelineError",
    "DataValidationError",
    "EarlyStoppingConfig",
    "FitReport",
    "GradientTrainer",
    "LearningRateMonitorConfig",
    "MinMaxNormalizer",
    "ModelCheckpointConfig",
    "Node",
    "NotInitializedError",
    "OptimizerConfig",
    "Pipeline",
    "PipelineError",
    "PipelineMetadata",
    "PortConnectionError",
    "PortSpec",
    "RXGlobal",
    "SchedulerConfig",
    "ScoreToLogit",
    "SingleCu3sDataModule",
    "SoftChannelSelector",
    "StatisticalTrainer",
    "TrainablePCA",
    "TrainerConfig",
    "TrainingConfig",
    "TrainingError",
    "register_node",
]
