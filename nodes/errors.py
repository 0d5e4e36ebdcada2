"""Named errors of cubeline's model layer.

Every domain error says what went wrong *and* what to do about it (torchgeo's habit): the
message names the file, field or port involved and the fix.
"""

from __future__ import annotations


class CubelineError(Exception):
    """Base class of every error raised on purpose by cubeline."""


class PipelineError(CubelineError):
    """The graph itself is invalid (cycle, duplicate name, unknown node, missing input)."""


class PortConnectionError(PipelineError):
    """Two ports cannot be connected (unknown port, dtype or dimension mismatch, a cycle)."""


class NotInitializedError(CubelineError):
    """A statistical node was used before Phase 1 fitted it."""


class DataValidationError(CubelineError):
    """An input file, frame or annotation failed validation (names file, field and fix)."""


class ConfigError(CubelineError):
    """A configuration (YAML, params.yaml, pipeline file) is invalid."""


class TrainingError(CubelineError):
    """Phase 2 cannot start or had to stop (no loss node, NaN loss, unknown optimizer...)."""


class DegenerateStatisticsError(TrainingError):
    """Phase-1 statistics cannot give a detector.

    Zero-variance bands, a singular covariance, non-finite scores or threshold.
    """


class StorageError(CubelineError):
    """A file or folder cannot be read or written (disk full, read-only, dangling link...)."""


class ContentHashError(CubelineError):
    """A file on disk does not match the content hash recorded for it: it is not used."""


class NoAnomaliesWarning(UserWarning):
    """An evaluation split holds no anomalous pixel: IoU/F1 are 0 and AP/AUROC undefined.

    Turn it into an error where a run must not go on (``warnings.simplefilter("error",
    NoAnomaliesWarning)``), e.g. in an orchestrated flow.
    """
