"""The pipeline as an MLflow pyfunc model: log, register, load by alias, identical scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks.registry import GateConfig, RegistryError, register_and_promote, split_id_of

REPO = Path(__file__).resolve().parents[2]
C = 16


def _frames() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    cubes = rng.gamma(2.0, 1.0, size=(3, 14, 12, C)).astype(np.float32)
    masks = np.zeros((3, 14, 12), bool)
    masks[:, 4:6, 3:6] = True
    cubes[masks] += rng.normal(4.0, 0.5, size=(int(masks.sum()), C)).astype(np.float32)
    return cubes, masks


@pytest.fixture(scope="module")
def fitted() -> Any:
    from nodes import StatisticalTrainer
    from nodes.data import CubeDataModule
    from nodes.library.presets import build_channel_selector_pipeline

    cubes, masks = _frames()
    dm = CubeDataModule.from_arrays(cubes, masks, [0], [1], [2], batch_size=1)
    pipeline = build_channel_selector_pipeline(input_channels=C, n_select=4)
    StatisticalTrainer(pipeline=pipeline, datamodule=dm).fit()
    pipeline.eval()
    return pipeline


@pytest.fixture(scope="module")
def logged(fitted: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import mlflow

    from tasks.pyfunc_model import log_pipeline_model
    from tasks.tracking import configure_mlflow

    root = tmp_path_factory.mktemp("pyfunc-store")
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = configure_mlflow(None, root, experiment_name="pyfunc-tests")
    cubes, _ = _frames()
    with mlflow.start_run() as run:
        info = log_pipeline_model(fitted, input_example=cubes[:1], description="test model")
    result = register_and_promote(
        run.info.run_id,
        info.model_uri,
        {"metrics_anomaly/auroc": 0.9},
        split_id_of(["2"], "synthetic"),
        GateConfig(metric="metrics_anomaly/auroc"),
        "pyfunc-test",
        "test",
    )
    assert result.champion_version == "1"
    yield {"info": info, "uri": uri, "root": root, "name": "pyfunc-test"}
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _reference(pipeline: Any, cubes: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = pipeline.forward(batch={"cube": torch.from_numpy(cubes)}, stage="inference")
    return {
        "scores": out["rx.scores"].numpy(),
        "logits": out["logit_head.logits"].numpy(),
        "decisions": out["decider.decisions"].numpy(),
    }


def test_signature_requirements_and_code_are_logged(logged: dict[str, Any]) -> None:
    import mlflow

    from tasks.pyfunc_model import pinned_requirements

    info = logged["info"]
    sig = info.signature.to_dict()
    inputs = json.loads(sig["inputs"])
    outputs = {o["name"]: o for o in json.loads(sig["outputs"])}
    assert inputs == [
        {
            "type": "tensor",
            "tensor-spec": {"dtype": "float32", "shape": [-1, -1, -1, C]},
            "name": "cube",
        }
    ]
    assert set(outputs) == {"scores", "logits", "decisions"}
    assert outputs["decisions"]["tensor-spec"]["dtype"] == "bool"
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    reqs = (local / "requirements.txt").read_text().split()
    assert reqs == pinned_requirements()
    assert any(r.startswith("torch==") for r in reqs)
    assert (local / "code" / "nodes" / "graph" / "pipeline.py").is_file()
    assert (local / "artifacts" / "pipeline.yaml").is_file()
    assert (local / "artifacts" / "pipeline.pt").is_file()
    # The example is an 8x8 crop, not the whole cube (it is stored as JSON).
    example = json.loads((local / "input_example.json").read_text())
    assert np.asarray(example["cube"]).shape == (1, 8, 8, C)


def test_champion_loads_back_with_identical_scores(fitted: Any, logged: dict[str, Any]) -> None:
    import mlflow

    from nodes import Pipeline
    from tasks.pyfunc_model import load_champion

    cubes, _ = _frames()
    ref = _reference(fitted, cubes)
    pipeline = load_champion(logged["name"])
    assert isinstance(pipeline, Pipeline)
    again = _reference(pipeline, cubes)
    for key in ref:
        np.testing.assert_array_equal(again[key], ref[key])

    model = mlflow.pyfunc.load_model(f"models:/{logged['name']}@champion")
    out = model.predict(cubes)
    for key in ref:
        np.testing.assert_array_equal(out[key], ref[key])
    # A mapping input and any spatial size are accepted.
    crop = cubes[:2, 3:11, 2:9]
    out_crop = model.predict({"cube": crop})
    np.testing.assert_array_equal(out_crop["scores"], _reference(fitted, crop)["scores"])


def test_wrong_band_count_is_rejected_by_the_signature(logged: dict[str, Any]) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{logged['name']}@champion")
    with pytest.raises(MlflowException, match="schema"):
        model.predict(np.zeros((1, 4, 4, C + 1), np.float32))


def test_load_champion_without_champion_says_what_to_do(logged: dict[str, Any]) -> None:
    from tasks.pyfunc_model import load_champion

    with pytest.raises(RegistryError, match=r"no alias 'champion'.*cubeline run"):
        load_champion("never-registered")


def test_bad_outputs_are_a_config_error(fitted: Any, logged: dict[str, Any]) -> None:
    import mlflow

    from nodes.errors import ConfigError
    from tasks.pyfunc_model import log_pipeline_model

    cubes, _ = _frames()
    with mlflow.start_run(), pytest.raises(ConfigError, match=r"rx\.nope"):
        log_pipeline_model(fitted, input_example=cubes[:1], outputs={"scores": "rx.nope"})


@pytest.mark.slow
def test_model_loads_where_cubeline_is_not_installed(
    fitted: Any, logged: dict[str, Any], tmp_path: Path
) -> None:
    cubes, _ = _frames()
    np.save(tmp_path / "cubes.npy", cubes)
    script = textwrap.dedent(
        f"""
        import sys
        # Hide the editable install and the checkout: only the model's code/ may provide nodes.
        sys.meta_path = [
            f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
        ]
        sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
        try:
            import nodes
            raise SystemExit("nodes importable before loading: the test proves nothing")
        except ImportError:
            pass
        import numpy as np, mlflow
        mlflow.set_tracking_uri({logged["uri"]!r})
        model = mlflow.pyfunc.load_model("models:/{logged["name"]}@champion")
        import nodes
        assert "/code/nodes/" in nodes.__file__.replace("\\\\", "/"), nodes.__file__
        out = model.predict(np.load({str(tmp_path / "cubes.npy")!r}))
        np.save({str(tmp_path / "scores.npy")!r}, out["scores"])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(
        np.load(tmp_path / "scores.npy"), _reference(fitted, cubes)["scores"]
    )


def test_requirement_mismatches_looks_up_each_pin() -> None:
    import importlib.metadata

    from tasks.pyfunc_model import pinned_requirements, requirement_mismatches

    assert requirement_mismatches(pinned_requirements()) == []
    numpy_version = importlib.metadata.version("numpy")
    found = requirement_mismatches(
        [
            "numpy==0.0.1",
            f"numpy=={numpy_version}",
            "surely-not-installed-cubeline-pkg>=1",
            "-r requirements.txt",  # not a requirement line: skipped, as MLflow does
            'numpy==0.0.1; python_version < "3"',  # marker excludes this interpreter
        ]
    )
    assert found == [
        f"numpy (current: {numpy_version}, required: numpy==0.0.1)",
        "surely-not-installed-cubeline-pkg (current: uninstalled, required: "
        "surely-not-installed-cubeline-pkg>=1)",
    ]


def test_direct_requirement_check_warns_and_is_undone(caplog: pytest.LogCaptureFixture) -> None:
    import mlflow.pyfunc
    import mlflow.utils.environment

    from tasks.pyfunc_model import _direct_requirement_check

    name = "warn_dependency_requirement_mismatches"
    before = getattr(mlflow.utils.environment, name), getattr(mlflow.pyfunc, name)
    with _direct_requirement_check():
        swapped = getattr(mlflow.utils.environment, name)
        assert swapped is not before[0]
        assert getattr(mlflow.pyfunc, name) is swapped
        with caplog.at_level("WARNING"):
            swapped(["numpy==0.0.1"])
    assert (getattr(mlflow.utils.environment, name), getattr(mlflow.pyfunc, name)) == before
    assert "numpy (current:" in caplog.text and "required: numpy==0.0.1" in caplog.text
