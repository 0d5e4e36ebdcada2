"""cubeline's model layer: typed-port nodes, the pipeline graph and the two training phases.

Pure PyTorch + Lightning + pydantic + pandera; never imports prefect, mlflow or dvc.
Every public name loads on first use (PEP 562), so ``from nodes.errors import ...`` or a
command-line tool that needs one piece does not pay for torch, torchmetrics and Lightning.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.base import Node
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
    from nodes.gradient_trainer import GradientTrainer
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

_EXPORTS: dict[str, str] = {
    "Node": "nodes.base",
    "AnomalyDataNode": "nodes.data_node",
    "BinaryDecider": "nodes.heads",
    "ScoreToLogit": "nodes.heads",
    "AnomalyBCEWithLogits": "nodes.losses",
    "AnomalyDetectionMetrics": "nodes.metrics",
    "MinMaxNormalizer": "nodes.normalization",
    "TrainablePCA": "nodes.pca",
    "Pipeline": "nodes.pipeline",
    "PipelineMetadata": "nodes.pipeline",
    "PortSpec": "nodes.ports",
    "NODE_REGISTRY": "nodes.registry",
    "register_node": "nodes.registry",
    "RXGlobal": "nodes.rx",
    "SoftChannelSelector": "nodes.selector",
    "FitReport": "nodes.statistical_trainer",
    "StatisticalTrainer": "nodes.statistical_trainer",
    "GradientTrainer": "nodes.gradient_trainer",
    "CubeDataModule": "nodes.data",
    "SingleCu3sDataModule": "nodes.data",
    **dict.fromkeys(
        ["ConfigError", "CubelineError", "DataValidationError", "NotInitializedError",
         "PipelineError", "PortConnectionError", "TrainingError"],
        "nodes.errors",
    ),
    **dict.fromkeys(
        ["CallbacksConfig", "EarlyStoppingConfig", "LearningRateMonitorConfig",
         "ModelCheckpointConfig", "OptimizerConfig", "SchedulerConfig", "TrainerConfig",
         "TrainingConfig"],
        "nodes.config",
    ),
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nodes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
