"""Trainable PCA (nodes/library/pca.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodes import NotInitializedError, TrainablePCA
from nodes.training.stats import MomentState


def _data(n: int = 4000, c: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.2])[:c]
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    return (rng.normal(size=(n, c)) * scales) @ q.T + rng.normal(size=c)


def test_components_are_the_covariance_eigenvectors() -> None:
    x = _data()
    pca = TrainablePCA(n_components=3, input_dim=6)
    assert pca.requires_initial_fit and not pca.is_initialized
    with pytest.raises(NotInitializedError):
        pca(data=torch.zeros(1, 1, 1, 6))
    pca.fit_from_moments(MomentState.from_samples(torch.from_numpy(x)))
    assert pca.components.shape == (3, 6) and pca.explained_variance.shape == (3,)
    evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(evals)[::-1][:3]
    np.testing.assert_allclose(pca.explained_variance.numpy(), evals[order], rtol=1e-5)
    comps = pca.components.double().numpy()
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-6)
    # Same axes up to sign; the sign convention makes the largest loading positive.
    for k, i in enumerate(order):
        assert abs(abs(float(comps[k] @ evecs[:, i])) - 1.0) < 1e-6
        assert comps[k][np.abs(comps[k]).argmax()] > 0
    assert bool((pca.explained_variance[:-1] >= pca.explained_variance[1:]).all())
    np.testing.assert_allclose(pca.mean.numpy(), x.mean(0), rtol=1e-6)


def test_forward_and_affine_map_agree() -> None:
    x = _data(c=5)
    st = MomentState.from_samples(torch.from_numpy(x))
    pca = TrainablePCA(n_components=2, input_dim=5)
    pca.fit_from_moments(st)
    cube = torch.from_numpy(x[:60].reshape(2, 5, 6, 5)).float()
    y = pca(data=cube)["projected"]
    assert y.shape == (2, 5, 6, 2)
    torch.testing.assert_close(y, (cube - pca.mean) @ pca.components.T)
    amap = pca.affine_map()
    assert amap is not None
    a, b, keeps = amap
    assert not keeps
    pushed = st.affine(a, b)
    # Projected scores are centred and decorrelated, with the explained variances.
    torch.testing.assert_close(pushed.mean, torch.zeros(2, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(pushed.cov(), torch.diag(pca.explained_variance.double()),
                               rtol=1e-5, atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"n_components must be in 1\.\.4"):
        TrainablePCA(n_components=5, input_dim=4)
