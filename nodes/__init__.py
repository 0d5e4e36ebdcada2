"""cubeline's model layer: typed-port nodes, the pipeline graph and the two training phases.

Pure PyTorch + Lightning + pydantic + pandera; never imports prefect, mlflow or dvc.
Every public name loads on first use (PEP 562), so ``from nodes.errors import ...`` or a
command-line tool that needs one piece does not pay for torch, torchmetrics and Lightning.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.data import CubeDataModule, SingleCu3sDataModule
    from nodes.errors import (
        ConfigError,
        CubelineError,
        DataValidationError,
        NotInitializedError,
        PipelineError,
        PortConnectionError,
        TrainingError,
    )
    from nodes.graph.base import Node
    from nodes.graph.pipeline import Pipeline, PipelineMetadata
    from nodes.graph.ports import PortSpec
    from nodes.graph.registry import NODE_REGISTRY, register_node
    from nodes.library.data_node import AnomalyDataNode
    from nodes.library.heads import BinaryDecider, ScoreToLogit
    from nodes.library.losses import AnomalyBCEWithLogits
    from nodes.library.metrics import AnomalyDetectionMetrics
    from nodes.library.normalization import MinMaxNormalizer
    from nodes.library.pca import TrainablePCA
    from nodes.library.rx import RXGlobal
    from nodes.library.selector import SoftChannelSelector
    from nodes.training.config import (
        CallbacksConfig,
        EarlyStoppingConfig,
        LearningRateMonitorConfig,
        ModelCheckpointConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainerConfig,
        TrainingConfig,
    )
    from nodes.training.gradient_trainer import GradientTrainer
    from nodes.training.statistical_trainer import FitReport, StatisticalTrainer

_EXPORTS: dict[str, str] = {
    "Node": "nodes.graph.base",
    "AnomalyDataNode": "nodes.library.data_node",
    "BinaryDecider": "nodes.library.heads",
    "ScoreToLogit": "nodes.library.heads",
    "AnomalyBCEWithLogits": "nodes.library.losses",
    "AnomalyDetectionMetrics": "nodes.library.metrics",
    "MinMaxNormalizer": "nodes.library.normalization",
    "TrainablePCA": "nodes.library.pca",
    "Pipeline": "nodes.graph.pipeline",
    "PipelineMetadata": "nodes.graph.pipeline",
    "PortSpec": "nodes.graph.ports",
    "NODE_REGISTRY": "nodes.graph.registry",
    "register_node": "nodes.graph.registry",
    "RXGlobal": "nodes.library.rx",
    "SoftChannelSelector": "nodes.library.selector",
    "FitReport": "nodes.training.statistical_trainer",
    "StatisticalTrainer": "nodes.training.statistical_trainer",
    "GradientTrainer": "nodes.training.gradient_trainer",
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
        "nodes.training.config",
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
