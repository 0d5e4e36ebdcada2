"""Mergeable float64 moment accumulators (nodes/training/stats.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from nodes.training.stats import MomentAccumulator, MomentState, merge_all

TOL = 1e-10
F64 = torch.float64


def _data(n: int = 3000, c: int = 7, seed: int = 0) -> torch.Tensor:
    # Offset far from zero and correlated: the regime where naive sum-of-squares formulas lose
    # digits and the centred (Chan) update must not.
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(c, c))
    x = rng.normal(size=(n, c)) @ mix + 1e3
    return torch.from_numpy(x)


def _ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xd = x.to(F64)
    mean = xd.mean(0)
    d = xd - mean
    return mean, d.T @ d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def _assert_same(a: MomentState, b: MomentState, tol: float = TOL) -> None:
    assert a.count == b.count
    assert _rel(a.mean, b.mean) <= tol
    assert _rel(a.m2, b.m2) <= tol
    assert torch.equal(a.min, b.min)
    assert torch.equal(a.max, b.max)


def _random_split(n: int, parts: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``parts`` contiguous uneven slices covering 0..n; some may be empty."""
    cuts = np.sort(rng.integers(0, n + 1, size=parts - 1))
    # Force at least one empty part now and then.
    if parts > 2 and rng.random() < 0.5:
        cuts[rng.integers(0, parts - 1)] = cuts[0]
        cuts = np.sort(cuts)
    bounds = [0, *cuts.tolist(), n]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def test_one_pass_matches_float64_reference() -> None:
    x = _data()
    st = MomentState.from_samples(x)
    mean, m2 = _ref(x)
    assert st.count == x.shape[0]
    assert _rel(st.mean, mean) <= TOL
    assert _rel(st.m2, m2) <= TOL
    assert torch.equal(st.min, x.amin(0))
    assert torch.equal(st.max, x.amax(0))
    np.testing.assert_allclose(st.cov().numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(st.var(ddof=0).numpy(), x.numpy().var(0), rtol=1e-10)


def test_chunking_does_not_change_the_result() -> None:
    x = _data(n=5000)
    whole = MomentState.from_samples(x)
    _assert_same(MomentState.from_samples(x, chunk=97), whole)
    head = x[:300]  # one merge per sample is slow: keep it short
    _assert_same(MomentState.from_samples(head, chunk=1), MomentState.from_samples(head), tol=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_any_split_merges_to_one_pass(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = _data(n=int(rng.integers(50, 2500)), c=int(rng.integers(1, 9)), seed=seed)
    parts = int(rng.integers(1, 9))
    one = MomentState.from_samples(x)
    states = []
    for lo, hi in _random_split(x.shape[0], parts, rng):
        acc = MomentAccumulator(x.shape[1], chunk=int(rng.integers(1, 400)))
        acc.update(x[lo:hi])
        states.append(acc.finalize())
    # Left fold in the given order, a shuffled order, and the tree of merge_all agree.
    folded = MomentAccumulator(x.shape[1])
    for st in states:
        folded.merge(st)
    _assert_same(folded.finalize(), one)
    shuffled = [states[i] for i in rng.permutation(len(states))]
    acc2 = MomentAccumulator(x.shape[1])
    for st in shuffled:
        acc2.merge(MomentAccumulator(x.shape[1]))  # empty accumulators are the identity
        acc2.merge(st)
    _assert_same(acc2.finalize(), one)
    _assert_same(merge_all(shuffled), one)


def test_streaming_updates_in_uneven_batches_equal_one_pass() -> None:
    x = _data(n=4000, c=5)
    acc = MomentAccumulator(5, chunk=256)
    for lo, hi in [(0, 0), (0, 1), (1, 2), (2, 1000), (1000, 1000), (1000, 3999), (3999, 4000)]:
        acc.update(x[lo:hi])
    _assert_same(acc.finalize(), MomentState.from_samples(x))


def test_float32_input_is_accumulated_in_float64() -> None:
    x32 = _data(n=2000).float()
    st = MomentState.from_samples(x32)
    assert st.mean.dtype == F64 and st.m2.dtype == F64
    mean, m2 = _ref(x32.double())
    assert _rel(st.mean, mean) <= TOL
    assert _rel(st.m2, m2) <= TOL


def test_update_does_not_modify_the_callers_tensor() -> None:
    x = _data(n=100)
    before = x.clone()
    MomentAccumulator(x.shape[1]).update(x)
    assert torch.equal(x, before)


def test_merge_all_and_identity() -> None:
    x = _data(n=999, c=4)
    states = [MomentState.from_samples(x[i : i + 111]) for i in range(0, 999, 111)]
    _assert_same(merge_all(states), MomentState.from_samples(x))
    _assert_same(merge_all([states[0]]), states[0], tol=0.0)
    empty = MomentState.empty(4)
    _assert_same(empty.merge(states[1]), states[1], tol=0.0)
    _assert_same(states[1].merge(empty), states[1], tol=0.0)
    assert merge_all([empty, empty]).count == 0
    with pytest.raises(ValueError):
        merge_all([])


def test_merge_rejects_other_channel_count() -> None:
    with pytest.raises(ValueError, match="4 and 3 channels"):
        MomentState.empty(4).merge(MomentState.empty(3))


def test_update_rejects_wrong_shape() -> None:
    acc = MomentAccumulator(4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        acc.update(torch.zeros(10, 3))
    with pytest.raises(ValueError):
        acc.update(torch.zeros(2, 5, 4))


def test_state_dict_round_trip_through_torch_save() -> None:
    x = _data(n=500, c=6)
    acc = MomentAccumulator(6)
    acc.update(x[:300])
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert set(state) == {"n", "mean", "m2", "min", "max"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = MomentAccumulator(6)
    resumed.load_state_dict(state)
    _assert_same(resumed.finalize(), acc.finalize(), tol=0.0)
    resumed.update(x[300:])  # resuming then streaming the rest equals one pass
    _assert_same(resumed.finalize(), MomentState.from_samples(x))
    with pytest.raises(KeyError, match="m2"):
        MomentState.from_dict({k: v for k, v in state.items() if k != "m2"})


def test_cov_needs_enough_samples() -> None:
    st = MomentState.from_samples(torch.ones(1, 3))
    with pytest.raises(ValueError, match="more than 1 samples"):
        st.cov()


def test_affine_push_matrix_equals_moments_of_transformed_data() -> None:
    x = _data(n=3000, c=6)
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(size=(4, 6)))
    b = torch.from_numpy(rng.normal(size=4))
    pushed = MomentState.from_samples(x).affine(a, b)
    direct = MomentState.from_samples(x @ a.T + b)
    assert pushed.count == direct.count
    assert _rel(pushed.mean, direct.mean) <= 1e-10
    assert _rel(pushed.m2, direct.m2) <= 1e-10
    assert torch.equal(pushed.m2, pushed.m2.T)
    assert not pushed.has_minmax  # channel mixing loses min/max


def test_affine_push_diagonal_scale_keeps_minmax() -> None:
    x = _data(n=2000, c=5)
    rng = np.random.default_rng(2)
    s = torch.from_numpy(rng.uniform(0.1, 3.0, size=5))
    b = torch.from_numpy(rng.normal(size=5))
    pushed = MomentState.from_samples(x).affine(s, b, keeps_minmax=True)
    direct = MomentState.from_samples(x * s + b)
    assert _rel(pushed.mean, direct.mean) <= 1e-10
    assert _rel(pushed.m2, direct.m2) <= 1e-10
    assert pushed.has_minmax
    assert _rel(pushed.min, direct.min) <= 1e-12
    assert _rel(pushed.max, direct.max) <= 1e-12
    # A negative scale swaps min and max: they must be marked unknown, not silently wrong.
    flipped = MomentState.from_samples(x).affine(-s, b, keeps_minmax=True)
    assert not flipped.has_minmax


def test_affine_push_scalar_scale() -> None:
    x = _data(n=1000, c=3)
    pushed = MomentState.from_samples(x).affine(torch.tensor(0.5), torch.tensor(-2.0),
                                                keeps_minmax=True)
    direct = MomentState.from_samples(x * 0.5 - 2.0)
    assert _rel(pushed.mean, direct.mean) <= 1e-12
    assert _rel(pushed.m2, direct.m2) <= 1e-12
    assert _rel(pushed.max, direct.max) <= 1e-12


def test_affine_composition_equals_single_map() -> None:
    x = _data(n=1500, c=6)
    rng = np.random.default_rng(3)
    a1, b1 = torch.from_numpy(rng.normal(size=(6, 6))), torch.from_numpy(rng.normal(size=6))
    a2 = torch.from_numpy(rng.normal(size=(2, 6)))
    st = MomentState.from_samples(x)
    chained = st.affine(a1, b1).affine(a2)
    single = st.affine(a2 @ a1, a2 @ b1)
    assert _rel(chained.mean, single.mean) <= 1e-10
    assert _rel(chained.m2, single.m2) <= 1e-10


def test_fused_backend_is_the_triton_module_where_triton_imports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA kernel module is found at its path; only Triton's absence turns it off."""
    import importlib.util

    from nodes.training import stats as stats_mod

    assert importlib.util.find_spec("nodes.training.stats_cuda") is not None
    monkeypatch.setattr(stats_mod, "_FUSED_TRIED", False)
    monkeypatch.setattr(stats_mod, "_FUSED", None)
    has_triton = importlib.util.find_spec("triton") is not None
    backend = stats_mod._fused_backend()
    assert (backend is not None) == has_triton
    if backend is not None:
        assert backend.__name__ == "nodes.training.stats_cuda"
