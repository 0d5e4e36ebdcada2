"""The cubeline pipeline as an MLflow ``pyfunc`` model, logged as code (not pickled).

The model is this file plus two artifacts, the pipeline's YAML and ``.pt`` weights written by
``Pipeline.save_to_file``; ``load_context`` rebuilds the pipeline with ``Pipeline.load_from_file``
(weights through ``torch.load(weights_only=True)``: loading a model never unpickles code).
The ``nodes`` package travels in the model's ``code/`` directory (``code_paths``), so the model
loads in any environment with the pinned requirements, with no cubeline checkout.

MLflow's "models from code" loader executes this file under a module named ``code_model_<hex>``
and expects it to call ``mlflow.models.set_model``; the last lines do that only in that case, so
importing ``tasks.pyfunc_model`` normally has no side effect. The file therefore imports nothing
from ``tasks`` at module level (``tasks`` is not shipped with the model).

Requirements are given explicitly, pinned to the versions installed at logging time: MLflow's
own inference of them imports and traces the model, which is slow. MLflow then checks those pins
against the environment (at logging and at loading) by mapping every installed distribution's
files to modules; :func:`_direct_requirement_check` answers the same question with one
``importlib.metadata.version`` lookup per pin.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo
    from mlflow.pyfunc import PyFuncModel

    from nodes import Pipeline

__all__ = [
    "DEFAULT_OUTPUTS",
    "PIPELINE_CONFIG_ARTIFACT",
    "PIPELINE_WEIGHTS_ARTIFACT",
    "CubelinePipelineModel",
    "load_champion",
    "load_champion_model",
    "log_pipeline_model",
    "pinned_requirements",
    "requirement_mismatches",
]

PIPELINE_CONFIG_ARTIFACT = "pipeline_config"
PIPELINE_WEIGHTS_ARTIFACT = "pipeline_weights"
SHA256_METADATA = "cubeline_sha256"

#: Model output name → ``"<node>.<port>"`` of the channel-selector preset.
DEFAULT_OUTPUTS: dict[str, str] = {
    "scores": "rx.scores",
    "logits": "logit_head.logits",
    "decisions": "decider.decisions",
}

#: Distributions the ``nodes`` package needs at inference (imports of nodes/ and of this file).
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "lightning",
    "torchmetrics",
    "numpy",
    "pydantic",
    "pandera",
    "pandas",
    "PyYAML",
    "scipy",
    "matplotlib",
)

#: Spatial size kept from the input example: the example is stored as JSON in the model, and a
#: full 100x100x205 cube would weigh ~40 MB there.
_EXAMPLE_PIXELS = 8


class CubelinePipelineModel(PythonModel):
    """pyfunc wrapper: float32 cubes (B, H, W, C) in, per-pixel scores/logits/decisions out."""

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.outputs: dict[str, str] = dict(DEFAULT_OUTPUTS)

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the pipeline from the logged YAML and weights (CPU, eval mode)."""
        from nodes import Pipeline

        config = context.model_config or {}
        self.outputs = dict(config.get("outputs", DEFAULT_OUTPUTS))
        pipeline = Pipeline.load_from_file(
            context.artifacts[PIPELINE_CONFIG_ARTIFACT],
            context.artifacts[PIPELINE_WEIGHTS_ARTIFACT],
            device="cpu",
        )
        pipeline.eval()
        self.pipeline = pipeline

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Score cubes.

        Args:
            context: MLflow's context (unused; the pipeline is loaded in ``load_context``).
            model_input: float32 (B, H, W, C) cubes, or a mapping with key ``"cube"``.
            params: Unused.

        Returns:
            ``{"scores": (B, H, W) float32, "logits": (B, H, W) float32, "decisions": (B, H, W)
            bool}`` (the names in the model's ``outputs`` config).
        """
        if self.pipeline is None:
            raise RuntimeError("CubelinePipelineModel.predict before load_context")
        return score_cubes(self.pipeline, model_input, self.outputs)


def score_cubes(
    pipeline: Pipeline, cubes: np.ndarray | Mapping[str, Any], outputs: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """Run ``pipeline`` in inference mode frame by frame and collect ``outputs`` as numpy.

    One frame at a time bounds memory by one cube whatever the batch size.

    Args:
        pipeline: A fitted pipeline.
        cubes: (B, H, W, C) float32 array, or a mapping holding it under ``"cube"``.
        outputs: Output name → ``"<node>.<port>"``.

    Returns:
        Output name → (B, H, W) array.
    """
    import torch

    from nodes.errors import DataValidationError

    raw = cubes["cube"] if isinstance(cubes, Mapping) else cubes
    array = np.asarray(raw)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise DataValidationError(
            f"model input: expected float32 cubes (B, H, W, C), got shape {array.shape}. Fix: "
            "stack frames on axis 0 with bands last."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise DataValidationError(
            f"model input: expected float32 cubes, got dtype {array.dtype}. Fix: convert with "
            "cube.astype(np.float32)."
        )
    keys = list(outputs.values())
    collected: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    with torch.no_grad():
        for frame in array:
            batch = {"cube": torch.from_numpy(np.ascontiguousarray(frame[None], np.float32))}
            result = pipeline.forward(batch=batch, stage="inference", outputs=keys)
            for name, key in outputs.items():
                collected[name].append(result[key].detach().cpu().numpy())
    return {name: np.concatenate(parts, axis=0) for name, parts in collected.items()}


def pinned_requirements() -> list[str]:
    """``name==version`` for every distribution the model needs, as installed now."""
    reqs = []
    for dist in _REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def requirement_mismatches(requirements: Sequence[str]) -> list[str]:
    """The requirements the running environment does not satisfy, as readable lines.

    Each ``name[extras] <specifier>`` is compared with ``importlib.metadata.version(name)``;
    lines that are not plain requirements (``-r file``, URLs, paths) and requirements whose
    environment marker excludes this interpreter are skipped, as MLflow's own check does.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    found = []
    for line in requirements:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{req.name} (current: uninstalled, required: {line})")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            found.append(f"{req.name} (current: {installed}, required: {line})")
    return found


def _warn_mismatches(requirements: list[str]) -> None:
    mismatches = requirement_mismatches(requirements)
    if mismatches:
        logging.getLogger("mlflow.utils.requirements_utils").warning(
            "The model's requirements are not satisfied by this Python environment:\n - %s\n"
            "Fix: install the model's pinned requirements "
            "(mlflow.pyfunc.get_model_dependencies(model_uri)).",
            "\n - ".join(mismatches),
        )


@contextmanager
def _direct_requirement_check() -> Iterator[None]:
    """Within the block, MLflow checks model requirements with :func:`requirement_mismatches`.

    MLflow warns when the environment does not satisfy a model's requirements, when logging
    and when loading it; its check first maps every installed distribution's files to
    modules (``packages_distributions``, a walk of site-packages) although requirements
    name distributions, which ``importlib.metadata.version`` looks up directly. The swap is
    undone on exit; if MLflow no longer has the function where expected, its own check runs.
    """
    import mlflow.pyfunc as pyfunc_module
    import mlflow.utils.environment as env_module

    name = "warn_dependency_requirement_mismatches"
    modules = [m for m in (env_module, pyfunc_module) if callable(getattr(m, name, None))]
    saved = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, _warn_mismatches)
    try:
        yield
    finally:
        for m, fn in zip(modules, saved, strict=True):
            setattr(m, name, fn)


def _example(input_example: np.ndarray) -> np.ndarray:
    from nodes.errors import DataValidationError

    array = np.asarray(input_example)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise DataValidationError(
            f"log_pipeline_model: input_example must be (B, H, W, C), got {array.shape}."
        )
    return np.ascontiguousarray(array[:1, :_EXAMPLE_PIXELS, :_EXAMPLE_PIXELS, :], np.float32)


def log_pipeline_model(
    pipeline: Pipeline,
    name: str = "model",
    input_example: np.ndarray | None = None,
    *,
    outputs: Mapping[str, str] | None = None,
    pipeline_name: str | None = None,
    description: str = "",
    tags: Sequence[str] = (),
    pip_requirements: Sequence[str] | None = None,
) -> ModelInfo:
    """Log ``pipeline`` into the active MLflow run as a pyfunc model with a signature.

    The signature is inferred from (a crop of) ``input_example`` and the model's own output on
    it, then relaxed to any height and width (-1): only the band count is fixed.

    Args:
        pipeline: Fitted pipeline.
        name: Model name inside the run.
        input_example: float32 (B, H, W, C) cubes; only an 8x8 crop of the first is stored.
        outputs: Output name → ``"<node>.<port>"`` (default: the channel-selector preset's).
        pipeline_name: ``PipelineMetadata.name`` written into the YAML (default: the pipeline's).
        description: ``PipelineMetadata.description``.
        tags: ``PipelineMetadata.tags``.
        pip_requirements: Override :func:`pinned_requirements`.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model_id>``).

    Raises:
        ConfigError: An output names a node or port the pipeline does not compute.
        DataValidationError: The input example is not (B, H, W, C).
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    import nodes
    from nodes import PipelineMetadata
    from nodes.errors import ConfigError

    outs = dict(outputs or DEFAULT_OUTPUTS)
    if input_example is None:
        raise ConfigError(
            "log_pipeline_model needs input_example (a float32 (B, H, W, C) cube) to infer the "
            "model signature."
        )
    example = _example(input_example)
    try:
        produced = score_cubes(pipeline, example, outs)
    except KeyError as exc:
        raise ConfigError(
            f"log_pipeline_model: output {exc} is not computed by pipeline "
            f"{pipeline.name!r} in the inference stage. Fix: pass outputs= with "
            "'<node>.<port>' keys of that pipeline."
        ) from exc
    inferred = infer_signature({"cube": example}, produced)
    relaxed_inputs = Schema(
        [TensorSpec(np.dtype(np.float32), (-1, -1, -1, example.shape[-1]), "cube")]
    )
    assert inferred.outputs is not None
    relaxed_outputs = Schema(
        [TensorSpec(spec.type, (-1, -1, -1), spec.name) for spec in inferred.outputs.inputs]
    )
    signature = ModelSignature(inputs=relaxed_inputs, outputs=relaxed_outputs)
    with tempfile.TemporaryDirectory(prefix="cubeline-model-") as tmp:
        config_path, weights_path = pipeline.save_to_file(
            Path(tmp) / "pipeline.yaml",
            metadata=PipelineMetadata(
                name=pipeline_name or pipeline.name, description=description, tags=list(tags)
            ),
        )
        import hashlib

        digests = {
            key: hashlib.sha256(Path(path).read_bytes()).hexdigest()
            for key, path in (
                (PIPELINE_CONFIG_ARTIFACT, config_path),
                (PIPELINE_WEIGHTS_ARTIFACT, weights_path),
            )
        }
        with _direct_requirement_check():
            return mlflow.pyfunc.log_model(
                name=name,
                # The files' SHA-256, so a registered version can pin them (tasks.serving).
                metadata={SHA256_METADATA: digests},
                python_model=str(Path(__file__).resolve()),
                artifacts={
                    PIPELINE_CONFIG_ARTIFACT: str(config_path),
                    PIPELINE_WEIGHTS_ARTIFACT: str(weights_path),
                },
                code_paths=[str(Path(nodes.__file__).resolve().parent)],
                model_config={"outputs": outs},
                signature=signature,
                input_example={"cube": example},
                pip_requirements=list(pip_requirements or pinned_requirements()),
            )


def load_champion_model(model_name: str, alias: str = "champion") -> PyFuncModel:
    """Load ``models:/<model_name>@<alias>`` as a pyfunc model (for scoring with its signature).

    Raises:
        RegistryError: The model has no such alias.
    """
    from tasks.registry import RegistryError, get_alias_version

    if get_alias_version(model_name, alias) is None:
        raise RegistryError(
            f"Registered model {model_name!r} has no alias {alias!r} in registry "
            f"{mlflow.get_registry_uri()}. Fix: run `cubeline run` (it registers and promotes "
            "a model), or check the model name in params.yaml (registry.model_name)."
        )
    with _direct_requirement_check():
        return mlflow.pyfunc.load_model(f"models:/{model_name}@{alias}")


def load_champion(model_name: str, alias: str = "champion") -> Pipeline:
    """Return the cubeline :class:`~nodes.Pipeline` that ``models:/<model_name>@<alias>`` holds.

    Args:
        model_name: Registered model name.
        alias: Alias to resolve.

    Returns:
        The rebuilt pipeline (CPU, eval mode).

    Raises:
        RegistryError: The model has no such alias.
    """
    wrapper = load_champion_model(model_name, alias).unwrap_python_model()
    pipeline = getattr(wrapper, "pipeline", None)
    if pipeline is None:
        from tasks.registry import RegistryError

        raise RegistryError(
            f"models:/{model_name}@{alias} is not a cubeline pipeline model (no pipeline after "
            "loading). Fix: register models logged with tasks.pyfunc_model.log_pipeline_model."
        )
    return pipeline


if __name__.startswith("code_model_"):
    mlflow.models.set_model(CubelinePipelineModel())
