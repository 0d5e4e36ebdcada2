"""Global RX (nodes/library/rx.py): published AUCs on the real ABU scenes, float64 reference
scores."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import nodes.library.rx as rx_module
from nodes import NotInitializedError, Pipeline, RXGlobal, StatisticalTrainer, hardware
from nodes.data import CubeDataModule
from nodes.errors import CubelineError
from nodes.library.data_node import AnomalyDataNode
from nodes.training.stats import MomentState

#: Published global-RX ROC AUC (shared/data/README.md; Pant et al. 2025, Table 5, RX column).
PUBLISHED_AUC: dict[str, float] = {
    "airport-1": 0.8221,
    "airport-2": 0.8404,
    "urban-4": 0.9887,
    "urban-5": 0.9692,
    "urban-1": 0.9907,
    "urban-2": 0.9946,
    "beach-3": 0.9999,
}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = scipy.io.loadmat(path)
    return d["data"], d["map"].astype(bool)


def _fit(rx: RXGlobal, pixels: np.ndarray | torch.Tensor) -> RXGlobal:
    rx.fit_from_moments(MomentState.from_samples(torch.as_tensor(pixels)))
    return rx


@pytest.mark.parametrize("scene", sorted(PUBLISHED_AUC))
def test_published_global_rx_auc(
    scene: str, scene_path: Callable[[str], Path], auc: Callable[..., float]
) -> None:
    """The textbook RX (all pixels, float64, ddof = 1, eps = 0) reproduces the paper."""
    cube, truth = _load(scene_path(scene))
    c = cube.shape[-1]
    rx = _fit(RXGlobal(num_channels=c, eps=0.0), cube.reshape(-1, c).astype(np.float64))
    # Score the float32 cube the data layer delivers: by default in float32 (float64-derived
    # whitener); the float64 scoring mode must give the same figure.
    x32 = torch.from_numpy(cube.astype(np.float32))[None]
    scores = rx(data=x32)["scores"]
    assert scores.shape == (1, *cube.shape[:2]) and scores.dtype == torch.float32
    assert abs(auc(scores.double().numpy(), truth) - PUBLISHED_AUC[scene]) <= 5e-4
    rx.score_dtype = "float64"
    scores64 = rx(data=x32)["scores"].double()
    assert abs(auc(scores64.numpy(), truth) - PUBLISHED_AUC[scene]) <= 5e-4
    # float32 scoring of raw 205-band radiance: measured max relative error 2.1e-5.
    np.testing.assert_allclose(scores.double().numpy(), scores64.numpy(), rtol=1e-4)


def test_published_auc_through_statistical_trainer(
    scene_path: Callable[[str], Path], auc: Callable[..., float]
) -> None:
    """Same figure when Phase 1 reads the scene through the data module (float32 batches)."""
    path = scene_path("airport-1")
    dm = CubeDataModule([path], train_ids=[0], val_ids=[0], test_ids=[0], batch_size=1)
    pipe = Pipeline("rx")
    data = AnomalyDataNode()
    rx = RXGlobal(num_channels=205, eps=0.0)
    pipe.connect((data.cube, rx.data))
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert report.passes == 1 and report.pixels == 100 * 100
    batch = next(iter(dm.test_dataloader()))
    out = pipe.forward(batch=batch)
    score = auc(out[f"{rx.name}.scores"].double().numpy(), batch["mask"].numpy())
    assert abs(score - PUBLISHED_AUC["airport-1"]) <= 5e-4


def test_scores_equal_explicit_inverse_reference() -> None:
    rng = np.random.default_rng(0)
    c = 6
    a = rng.normal(size=(c, c)) + 3 * np.eye(c)  # well conditioned
    x = rng.normal(size=(4000, c)) @ a.T + rng.normal(size=c)
    eps = 0.25
    rx = _fit(RXGlobal(num_channels=c, eps=eps), x)
    mu = x.mean(0)
    sigma = np.cov(x, rowvar=False) + eps * np.eye(c)
    probe = rng.normal(size=(2, 5, 7, c)) * 2 + mu
    d = probe.reshape(-1, c) - mu
    ref = np.einsum("ij,jk,ik->i", d, np.linalg.inv(sigma), d).reshape(2, 5, 7)
    got = rx(data=torch.from_numpy(probe))["scores"]
    assert got.dtype == torch.float64  # output dtype follows the input
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    got32 = rx(data=torch.from_numpy(probe).float())["scores"]
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(rx.mu.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(rx.sigma.numpy(), sigma, rtol=1e-10)


def test_buffers_are_nan_and_forward_refuses_before_fit() -> None:
    rx = RXGlobal(num_channels=4)
    assert rx.mu.shape == (4,) and rx.cov_factor.shape == (4, 4)
    assert torch.isnan(rx.mu).all()
    assert not rx._statistically_initialized
    with pytest.raises(NotInitializedError, match=r"StatisticalTrainer\.fit\(\) first"):
        rx(data=torch.zeros(1, 2, 2, 4))


def test_sigma_property_and_setter() -> None:
    rng = np.random.default_rng(1)
    c = 5
    a = rng.normal(size=(c, c))
    cov = torch.from_numpy(a @ a.T + c * np.eye(c))
    mean = torch.from_numpy(rng.normal(size=c))
    rx = RXGlobal(num_channels=c, eps=1e-3)
    rx.sigma = cov  # mu still NaN: not yet initialized
    assert not rx.is_initialized
    rx.mu = mean
    rx.sigma = cov  # guide's "Option 2": assign mu and sigma directly
    assert rx.is_initialized
    # Assigned as given: no ridge is added to an explicit covariance.
    torch.testing.assert_close(rx.sigma, cov, rtol=1e-12, atol=1e-12)
    assert rx.sigma.shape == (c, c) and rx.sigma.dtype == torch.float64
    torch.testing.assert_close(rx.sigma, rx.sigma.T, rtol=1e-14, atol=1e-14)
    # sigma is derived from the Cholesky factor, kept lower triangular.
    assert torch.equal(rx.cov_factor, torch.tril(rx.cov_factor))
    x = torch.from_numpy(rng.normal(size=(1, 3, 3, c)))
    d = (x.reshape(-1, c) - mean).numpy()
    ref = np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov.numpy()), d)
    np.testing.assert_allclose(rx(data=x)["scores"].reshape(-1).numpy(), ref, rtol=1e-10)
    with pytest.raises(CubelineError, match=r"\(5, 5\)"):
        rx.sigma = torch.eye(4, dtype=torch.float64)


def test_fit_adds_eps_ridge() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 3))
    rx = _fit(RXGlobal(num_channels=3, eps=0.5), x)
    np.testing.assert_allclose(rx.sigma.numpy(), np.cov(x, rowvar=False) + 0.5 * np.eye(3),
                               rtol=1e-10)


def test_non_positive_definite_covariance_error_says_what_to_do() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4))
    x[:, 2] = 0.0  # a dead band: zero variance, singular covariance
    rx = RXGlobal(num_channels=4, eps=0.0, name="rx_dead")
    with pytest.raises(CubelineError) as err:
        _fit(rx, x)
    msg = str(err.value)
    assert "rx_dead" in msg
    assert "not positive definite" in msg
    assert "eps" in msg  # the fix: raise eps, fewer channels, more pixels
    assert not rx.is_initialized  # nothing half-fitted
    with pytest.raises(CubelineError, match="not positive definite"):
        rx.sigma = -torch.eye(4, dtype=torch.float64)
    # The same data fits with a ridge.
    _fit(RXGlobal(num_channels=4, eps=1e-3), x)


def test_fit_rejects_other_channel_count() -> None:
    rx = RXGlobal(num_channels=4, name="rx4")
    with pytest.raises(CubelineError, match=r"rx4.*4 channels.*3"):
        _fit(rx, np.random.default_rng(0).normal(size=(50, 3)))


def _reference_scores(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    d = x.reshape(-1, x.shape[-1]) - mu
    return np.einsum("ij,jk,ik->i", d, np.linalg.inv(sigma), d).reshape(x.shape[:-1])


def test_chunked_cpu_scoring_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks with a ragged last one: every row is scored once, in its place."""
    rng = np.random.default_rng(4)
    c = 7
    x = rng.normal(size=(3, 11, 13, c)) @ (rng.normal(size=(c, c)) + 2 * np.eye(c))
    rx = _fit(RXGlobal(num_channels=c, eps=0.0, score_dtype="float64"), x.reshape(-1, c))
    ref = _reference_scores(x, rx.mu.numpy(), rx.sigma.numpy())
    whole = rx(data=torch.from_numpy(x))["scores"].numpy()
    monkeypatch.setattr(rx_module, "_BLOCK_BYTES", 300 * c * 8)  # 300 rows of 429
    with torch.no_grad():
        chunked = rx(data=torch.from_numpy(x))["scores"].numpy()
    np.testing.assert_allclose(whole, ref, rtol=1e-10)
    np.testing.assert_allclose(chunked, ref, rtol=1e-10)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5])
def test_float32_scoring_is_accurate_under_a_large_mean(offset: float) -> None:
    """The mean's float32 rounding is carried as a float64-derived bias: no cancellation.

    Noise of std 0.05 on a mean of 1e5: rounding the mean to float32 alone moves every pixel by
    up to 0.004, i.e. 8 % of a standard deviation, which would show as a score error far above
    1e-4.
    """
    rng = np.random.default_rng(5)
    c = 12
    base = rng.normal(size=(20000, c)) @ rng.normal(size=(c, c)) * 0.05
    x32 = (base + offset + np.linspace(0.1, 0.9, c)).astype(np.float32)
    rx = _fit(RXGlobal(num_channels=c, eps=0.0), x32.astype(np.float64))
    assert rx.score_dtype == "auto"
    got = rx(data=torch.from_numpy(x32))["scores"]
    assert got.dtype == torch.float32
    ref = _reference_scores(x32.astype(np.float64), rx.mu.numpy(), rx.sigma.numpy())
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4)
    rx.score_dtype = "float64"  # exact but for the rounding of the float32 output
    np.testing.assert_allclose(rx(data=torch.from_numpy(x32))["scores"].double().numpy(), ref,
                               rtol=2e-7)


def test_score_dtype_modes() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 4, 4, 3))
    rx = _fit(RXGlobal(num_channels=3, eps=0.1), x.reshape(-1, 3))
    assert rx._score_dtype(torch.from_numpy(x)) == torch.float64
    assert rx._score_dtype(torch.from_numpy(x).float()) == torch.float32
    assert rx._score_dtype(torch.from_numpy(x).half()) == torch.float32
    rx.score_dtype = "float32"
    assert rx._score_dtype(torch.from_numpy(x)) == torch.float32
    rx.score_dtype = "float64"
    assert rx._score_dtype(torch.from_numpy(x).float()) == torch.float64
    with pytest.raises(CubelineError, match="score_dtype"):
        RXGlobal(num_channels=3, score_dtype="float16")


def test_gradients_through_mu_and_cov_factor() -> None:
    """Unfrozen (Phase 2): exact float64 gradients; float32 scoring agrees; no stale cache."""
    rng = np.random.default_rng(7)
    c = 5
    x = rng.normal(size=(2, 6, 6, c)) @ (rng.normal(size=(c, c)) + 2 * np.eye(c)) + 40.0
    rx = _fit(RXGlobal(num_channels=c, eps=1e-3, score_dtype="float64"), x.reshape(-1, c))
    rx.unfreeze()
    data = torch.from_numpy(x)

    def scores(mu: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(rx, {"mu": mu, "cov_factor": factor}, (),
                                         {"data": data})
        return out["scores"]

    mu0, f0 = rx.mu.detach().clone(), rx.cov_factor.detach().clone()
    assert torch.autograd.gradcheck(
        scores, (mu0.clone().requires_grad_(), f0.clone().requires_grad_()), atol=1e-6
    )
    # Weighted loss (the plain sum has a zero mu-gradient at the fitted mean). Its analytic
    # gradient wrt mu: -2 P sum_i w_i (x_i - mu), P the precision.
    weights = torch.from_numpy(rng.uniform(size=x.shape[:-1]))
    rx.zero_grad()
    (rx(data=data)["scores"] * weights).sum().backward()
    assert rx.mu.grad is not None and rx.cov_factor.grad is not None
    prec = np.linalg.inv(rx.sigma.detach().numpy())
    want = -2 * prec @ (weights.reshape(-1, 1).numpy() * (x.reshape(-1, c) - mu0.numpy())).sum(0)
    np.testing.assert_allclose(rx.mu.grad.numpy(), want, rtol=1e-8, atol=1e-10)
    grads64 = (rx.mu.grad.clone(), rx.cov_factor.grad.clone())
    # The default mode on float32 input: float32 product, same gradients to float32 accuracy.
    rx.score_dtype = "auto"
    rx.zero_grad()
    (rx(data=data.float())["scores"] * weights.float()).sum().backward()
    assert rx.mu.grad is not None and rx.cov_factor.grad is not None
    for got, ref in zip((rx.mu.grad, rx.cov_factor.grad), grads64, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    # An optimizer step changes the scores (no whitener cached while unfrozen), and the
    # no-grad (validation) path gives the same values as the differentiable one.
    with torch.no_grad():
        before = rx(data=data)["scores"].clone()
        rx.mu.add_(0.5)
        after = rx(data=data)["scores"]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, rx(data=data)["scores"].detach(), rtol=1e-5, atol=1e-6)


def test_cpu_work_buffers_are_reused_and_safe_across_threads() -> None:
    """The process's scratch is kept between calls; concurrent callers get their own buffers."""
    rng = np.random.default_rng(8)
    c = 9
    xs = [rng.normal(size=(2, 40, 40, c)) * (k + 1) for k in range(4)]
    rx = _fit(RXGlobal(num_channels=c, eps=0.0), np.concatenate(xs).reshape(-1, c))
    inputs = [torch.from_numpy(x).float() for x in xs]
    with torch.no_grad():
        want = [rx(data=x)["scores"] for x in inputs]
        first = hardware.thread_arrays("rx.block", (4, c), np.float32)[0].ctypes.data
        rx(data=inputs[0])
        again = hardware.thread_arrays("rx.block", (4, c), np.float32)[0].ctypes.data
        assert again == first  # the thread's scratch is kept, not allocated per call

    def work(k: int) -> bool:
        with torch.no_grad():
            return all(torch.equal(rx(data=inputs[k])["scores"], want[k]) for _ in range(25))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(4)))
