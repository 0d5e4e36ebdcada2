"""Phase 1 (nodes/training/statistical_trainer.py): data passes, exactness, masking, subsampling."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from nodes import (
    AnomalyDataNode,
    AnomalyDetectionMetrics,
    BinaryDecider,
    CubelineError,
    DataValidationError,
    MinMaxNormalizer,
    Node,
    Pipeline,
    PipelineError,
    RXGlobal,
    ScoreToLogit,
    SoftChannelSelector,
    StatisticalTrainer,
    TrainablePCA,
)
from nodes.training.stats import MomentState

N = TypeVar("N", bound=Node)


def _node(pipe: Pipeline, name: str, cls: type[N]) -> N:
    node = pipe.nodes[name]
    assert isinstance(node, cls)
    return node


def _rx(pipe: Pipeline) -> RXGlobal:
    return _node(pipe, "rx", RXGlobal)


def _chain(channels: int, n_select: int = 4, eps: float = 0.0, head: bool = False) -> Pipeline:
    """data → normalizer → selector → RX [→ logit head → decider → metrics]."""
    pipe = Pipeline("chain")
    data = AnomalyDataNode()
    norm = MinMaxNormalizer(name="norm")
    sel = SoftChannelSelector(n_select=n_select, input_channels=channels, name="sel")
    rx = RXGlobal(num_channels=n_select, eps=eps, name="rx")
    pipe.connect((data.cube, norm.data), (norm.normalized, sel.data), (sel.selected, rx.data))
    if head:
        logit, decider = ScoreToLogit(name="head"), BinaryDecider(name="decider")
        metrics = AnomalyDetectionMetrics(name="metrics_anomaly")
        pipe.connect(
            (rx.scores, logit.scores), (logit.logits, decider.logits),
            (decider.decisions, metrics.decisions), (data.mask, metrics.targets),
            (logit.logits, metrics.logits),
        )
    return pipe


def _rx_only() -> Pipeline:
    pipe = Pipeline("rx")
    data = AnomalyDataNode()
    pipe.connect((data.cube, RXGlobal(num_channels=12, eps=0.0, name="rx").data))
    return pipe


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def _train_outputs(pipe: Pipeline, dm: Any, key: str) -> torch.Tensor:
    """``key`` for every training pixel, computed by the float32 forward pass, as (N, C)."""
    rows = []
    for i in dm.splits["train"]:
        batch = {k: v[None] for k, v in dm.dataset("train")[dm.splits["train"].index(i)].items()}
        out = pipe.forward(batch=batch, stage="train", outputs=[key])[key]
        rows.append(out.reshape(-1, out.shape[-1]) if out.ndim == 4 else out.reshape(-1, 1))
    return torch.cat(rows)


# ---------------------------------------------------------------------------- passes
def test_affine_chain_is_fitted_in_one_data_pass(make_dm: Callable[..., Any], cubes: Any) -> None:
    dm = make_dm(train_ids=[0, 1, 2, 5], batch_size=3)
    pipe = _chain(cubes.channels)
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert dm.train_frames_read == len(dm.splits["train"])  # every frame read exactly once
    assert dm.train_passes == 1
    assert report.passes == 1
    assert report.fitted == ["norm", "sel", "rx"]
    assert report.plan["rx"] == ("data.cube", ["norm", "sel"])
    assert report.pixels == 4 * 24 * 24
    assert set(report.root_moments) == {"data.cube"}
    assert all(n.is_initialized for n in pipe.node_list())


def test_frame_batches_and_loader_batches_fit_the_same_state(make_dm: Callable[..., Any],
                                                            cubes: Any) -> None:
    """Phase 1 reads one-frame batches where the data module offers them; same state either way."""
    frames_dm = make_dm(train_ids=[0, 1, 2, 5], batch_size=3)
    loader_dm = make_dm(train_ids=[0, 1, 2, 5], batch_size=3)
    loader_dm.frame_batches = lambda split: None  # a data module without one-frame batches
    states = []
    for dm in (frames_dm, loader_dm):
        pipe = _chain(cubes.channels)
        StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
        states.append(pipe.state_dict())
        assert dm.train_passes == 1
    for key, value in states[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, states[1][key], rtol=1e-12, atol=1e-12)


def test_a_node_behind_a_non_affine_node_needs_a_second_pass(
    make_dm: Callable[..., Any], cubes: Any
) -> None:
    dm = make_dm(train_ids=[0, 1, 2], batch_size=2)
    pipe = _chain(cubes.channels, head=True)
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert dm.train_frames_read == 2 * len(dm.splits["train"])
    assert report.passes == 2
    assert report.fitted == ["norm", "sel", "rx", "head"]
    assert report.plan["head"] == ("rx.scores", [])
    assert set(report.root_moments) == {"data.cube", "rx.scores"}
    # The head standardizes the training scores: mean 0, std init_scale.
    logits = _train_outputs(pipe, dm, "head.logits").double()
    assert abs(float(logits.mean())) < 1e-4
    assert abs(float(logits.std()) - 1.0) < 1e-4


def test_normalizer_behind_a_fitted_selector_waits_for_it(
    make_dm: Callable[..., Any], cubes: Any
) -> None:
    """data → selector(variance) → normalizer → RX: the normalizer needs the exact min/max of
    the selector's output, which exists only once the selector is fitted; RX's affine chain runs
    through both. Two passes, and every fit exact."""
    pipe = Pipeline("sel-first")
    data = AnomalyDataNode()
    sel = SoftChannelSelector(n_select=4, input_channels=cubes.channels, name="sel")
    norm = MinMaxNormalizer(per_channel=True, name="norm")
    rx = RXGlobal(num_channels=4, eps=0.0, name="rx")
    pipe.connect((data.cube, sel.data), (sel.selected, norm.data), (norm.normalized, rx.data))
    dm = make_dm(train_ids=[0, 1, 2], batch_size=2)
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert report.passes == 2 and dm.train_passes == 2
    assert report.fitted.index("sel") < report.fitted.index("norm") < report.fitted.index("rx")
    selected = _train_outputs(pipe, dm, "sel.selected")
    torch.testing.assert_close(norm.running_min, selected.amin(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(norm.running_max, selected.amax(0), rtol=1e-6, atol=1e-5)
    fed = _train_outputs(pipe, dm, "norm.normalized").double()
    assert _rel(rx.mu, fed.mean(0)) <= 1e-6
    assert _rel(rx.sigma, MomentState.from_samples(fed).cov()) <= 1e-5


def test_pipeline_without_statistical_nodes_reads_nothing(make_dm: Callable[..., Any]) -> None:
    dm = make_dm()
    pipe = Pipeline("none")
    pipe.connect((AnomalyDataNode().cube, MinMaxNormalizer(use_running_stats=False).data))
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert report.passes == 0 and report.fitted == []
    assert dm.train_frames_read == 0


def test_refit_false_skips_initialized_nodes(make_dm: Callable[..., Any], cubes: Any) -> None:
    pipe = _chain(cubes.channels, head=True)
    StatisticalTrainer(pipeline=pipe, datamodule=make_dm()).fit()
    mu = _rx(pipe).mu.clone()
    dm2 = make_dm(train_ids=[3, 4])
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm2, refit=False).fit()
    assert report.passes == 0 and dm2.train_frames_read == 0
    assert torch.equal(_rx(pipe).mu, mu)
    StatisticalTrainer(pipeline=pipe, datamodule=dm2).fit()  # refit (default) refits
    assert not torch.equal(_rx(pipe).mu, mu)


# ---------------------------------------------------------------------------- exactness
def test_fitted_rx_equals_moments_of_the_transformed_pixels(
    make_dm: Callable[..., Any], cubes: Any
) -> None:
    dm = make_dm(train_ids=[0, 1, 2], batch_size=2)
    pipe = _chain(cubes.channels, eps=0.0)
    StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    norm = _node(pipe, "norm", MinMaxNormalizer)
    sel = _node(pipe, "sel", SoftChannelSelector)
    rx = _rx(pipe)
    raw = torch.from_numpy(cubes.pixels([0, 1, 2]))
    assert float(norm.running_min) == float(raw.min())
    assert float(norm.running_max) == float(raw.max())
    # The selector picked the bands of highest variance of the normalized data.
    top = torch.topk(raw.var(0), 4).indices.sort().values
    assert torch.equal(sel.selected_channels, top)
    # RX statistics fitted from moments carried through the affine maps (float64) equal the
    # statistics of the pixels the float32 forward pass actually feeds RX.
    fed = _train_outputs(pipe, dm, "sel.selected").double()
    direct = MomentState.from_samples(fed)
    assert _rel(rx.mu, direct.mean) <= 1e-6
    assert _rel(rx.sigma, direct.cov()) <= 1e-6


def test_pca_chain_one_pass_and_decorrelated_rx(make_dm: Callable[..., Any], cubes: Any) -> None:
    dm = make_dm(train_ids=[0, 1, 2, 3], batch_size=2)
    pipe = Pipeline("pca")
    data, norm = AnomalyDataNode(), MinMaxNormalizer(name="norm")
    pca = TrainablePCA(n_components=3, input_dim=cubes.channels, name="pca")
    rx = RXGlobal(num_channels=3, eps=0.0, name="rx")
    pipe.connect((data.cube, norm.data), (norm.normalized, pca.data), (pca.projected, rx.data))
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert report.passes == 1 and dm.train_passes == 1
    # Principal scores are centred and decorrelated, with the explained variances.
    torch.testing.assert_close(rx.mu, torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(rx.sigma, torch.diag(pca.explained_variance.double()),
                               atol=1e-6 * float(pca.explained_variance[0]), rtol=0)
    fed = _train_outputs(pipe, dm, "pca.projected").double()
    assert _rel(rx.sigma, MomentState.from_samples(fed).cov()) <= 1e-5


def test_rx_on_raw_cube_equals_numpy_statistics(make_dm: Callable[..., Any], cubes: Any) -> None:
    pipe = _rx_only()
    StatisticalTrainer(pipeline=pipe, datamodule=make_dm(train_ids=[0, 1, 2])).fit()
    x = cubes.pixels([0, 1, 2])
    rx = _rx(pipe)
    np.testing.assert_allclose(rx.mu.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rx.sigma.numpy(), np.cov(x, rowvar=False), rtol=1e-9)


# ---------------------------------------------------------------------------- options
def test_normal_only_excludes_labelled_anomalies(make_dm: Callable[..., Any], cubes: Any) -> None:
    ids = [0, 1, 2]
    x, y = cubes.pixels(ids), cubes.labels(ids)
    assert 0 < y.sum() < y.size
    pipe = _rx_only()
    report = StatisticalTrainer(pipeline=pipe, datamodule=make_dm(train_ids=ids),
                                normal_only=True).fit()
    rx = _rx(pipe)
    assert report.pixels == int((~y).sum())
    np.testing.assert_allclose(rx.mu.numpy(), x[~y].mean(0), rtol=1e-12)
    np.testing.assert_allclose(rx.sigma.numpy(), np.cov(x[~y], rowvar=False), rtol=1e-9)
    # Default: every pixel counts (the textbook RX) — a visibly different background.
    everything = _rx_only()
    StatisticalTrainer(pipeline=everything, datamodule=make_dm(train_ids=ids)).fit()
    np.testing.assert_allclose(_rx(everything).mu.numpy(), x.mean(0), rtol=1e-12)
    assert not np.allclose(_rx(everything).mu.numpy(), x[~y].mean(0), rtol=1e-6)


def test_normal_only_through_the_affine_chain(
    make_dm: Callable[..., Any], cubes: Any, cube_factory: Callable[..., Any]
) -> None:
    data = cube_factory(5, seed=0)
    hot = np.argwhere(data.masks[0])[0]
    data.cubes[0][hot[0], hot[1], :] = 5000.0  # a saturated target pixel, labelled anomalous
    x, y = data.pixels([0, 1, 2]), data.labels([0, 1, 2])
    pipe = _chain(data.channels)
    dm = make_dm(train_ids=[0, 1, 2], data=data)
    StatisticalTrainer(pipeline=pipe, datamodule=dm, normal_only=True).fit()
    # Min-max comes from the normal pixels only: the saturated target does not stretch it.
    assert float(_node(pipe, "norm", MinMaxNormalizer).running_max) == float(x[~y].max()) < 5000.0
    assert float(_node(pipe, "norm", MinMaxNormalizer).running_min) == float(x[~y].min())
    fed = _train_outputs(pipe, dm, "sel.selected").double()[torch.from_numpy(~y)]
    assert _rel(_rx(pipe).mu, fed.mean(0)) <= 1e-6


def test_sample_fraction_is_seeded(make_dm: Callable[..., Any]) -> None:
    def fit(seed: int, fraction: float | None = 0.25) -> tuple[torch.Tensor, int]:
        pipe = _rx_only()
        report = StatisticalTrainer(pipeline=pipe, datamodule=make_dm(), sample_fraction=fraction,
                                    seed=seed).fit()
        return _rx(pipe).mu.clone(), report.pixels

    a, na = fit(7)
    b, nb = fit(7)
    c, nc = fit(8)
    _, nfull = fit(0, None)
    assert torch.equal(a, b) and na == nb  # same seed, same pixels
    assert not torch.equal(a, c)  # another seed, other pixels
    assert nfull == 3 * 24 * 24
    for n in (na, nc):
        assert abs(n - 0.25 * nfull) < 5 * (0.25 * 0.75 * nfull) ** 0.5


def test_sample_fraction_must_be_a_fraction(make_dm: Callable[..., Any]) -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(CubelineError, match="sample_fraction"):
            StatisticalTrainer(pipeline=_rx_only(), datamodule=make_dm(), sample_fraction=bad)


def test_normal_only_needs_a_data_node(make_dm: Callable[..., Any]) -> None:
    class _DataLess:
        def setup(self, stage: str) -> None:
            pass

        def train_dataloader(self) -> list[dict[str, torch.Tensor]]:
            return [{"cube": torch.rand(1, 4, 4, 3)}]

    pipe = Pipeline("p")
    pipe.add_node(ScoreToLogit(name="head"))
    with pytest.raises(PipelineError, match="no connection into its input 'scores'"):
        StatisticalTrainer(pipeline=pipe, datamodule=_DataLess()).fit()


def test_empty_training_split_is_an_error() -> None:
    class _Empty:
        def setup(self, stage: str) -> None:
            pass

        def train_dataloader(self) -> Iterator[dict[str, torch.Tensor]]:
            return iter(())

    with pytest.raises(DataValidationError, match=r"train split .* is empty"):
        StatisticalTrainer(pipeline=_rx_only(), datamodule=_Empty()).fit()


def test_one_batch_alive_at_a_time_during_a_pass() -> None:
    """While the loader builds batch k + 1, nothing of Phase 1 holds batch k any more."""
    alive_when_next_built: list[bool] = []

    class _Watched:
        def setup(self, stage: str) -> None:
            pass

        def train_dataloader(self) -> Iterator[dict[str, torch.Tensor]]:
            previous: weakref.ref[torch.Tensor] | None = None
            for seed in range(4):
                if previous is not None:
                    alive_when_next_built.append(previous() is not None)
                g = torch.Generator().manual_seed(seed)
                cube = torch.rand(2, 8, 8, 12, generator=g)
                previous = weakref.ref(cube)
                yield {"cube": cube, "mask": torch.zeros(2, 8, 8, dtype=torch.bool)}
                del cube

    StatisticalTrainer(pipeline=_rx_only(), datamodule=_Watched()).fit()
    assert alive_when_next_built == [False, False, False]


def test_loader_that_reuses_its_buffer_is_summed_batch_by_batch() -> None:
    """An iterable of our own may overwrite its last batch: no overlap for it, exact state."""
    frames = [torch.rand(2, 128, 128, 12, generator=torch.Generator().manual_seed(i)) * 100
              for i in range(4)]

    class _Reusing:
        def setup(self, stage: str) -> None:
            pass

        def train_dataloader(self) -> Iterator[dict[str, torch.Tensor]]:
            buf = torch.empty(2, 128, 128, 12)  # 32768 pixels: summed on the worker threads
            for f in frames:
                buf.copy_(f)
                yield {"cube": buf, "mask": torch.zeros(2, 128, 128, dtype=torch.bool)}

    trainer = StatisticalTrainer(pipeline=_rx_only(), datamodule=_Reusing())
    assert trainer._batches("train").fresh is False
    report = trainer.fit()
    x = torch.cat(frames).reshape(-1, 12).double()
    m = report.root_moments["data.cube"]
    assert _rel(m.mean, x.mean(0)) <= 1e-12
    assert _rel(m.m2, (x - x.mean(0)).T @ (x - x.mean(0))) <= 1e-12


def test_fresh_batch_sources_are_gathered_within_the_bound() -> None:
    """DataLoader batches are new tensors: small ones are held and summed several at a time,
    never more than one call's worth (gather_rows) besides the batch being built."""
    from torch.utils.data import DataLoader

    from nodes.training.stats_blocked import gather_rows

    alive: list[int] = []
    refs: list[weakref.ref[torch.Tensor]] = []
    frames = [torch.rand(128, 128, 12, generator=torch.Generator().manual_seed(i))
              for i in range(6)]

    def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        alive.append(sum(r() is not None for r in refs))
        cube = torch.stack(items)
        refs.append(weakref.ref(cube))
        return {"cube": cube, "mask": torch.zeros(2, 128, 128, dtype=torch.bool)}

    class _Loader:
        def setup(self, stage: str) -> None:
            pass

        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(frames, batch_size=2, collate_fn=collate)  # type: ignore[arg-type]

    trainer = StatisticalTrainer(pipeline=_rx_only(), datamodule=_Loader())
    assert trainer._batches("train").fresh is True
    report = trainer.fit()
    assert max(alive) * 2 * 128 * 128 <= gather_rows(12) + 2 * 128 * 128

    class _Unbatched(_Loader):
        def train_dataloader(self) -> DataLoader[Any]:  # items as they are: maybe one buffer
            return DataLoader(frames, batch_size=None)  # type: ignore[arg-type]

    assert StatisticalTrainer(pipeline=_rx_only(), datamodule=_Unbatched())._batches(
        "train").fresh is False
    x = torch.stack(frames).reshape(-1, 12).double()
    assert _rel(report.root_moments["data.cube"].m2, (x - x.mean(0)).T @ (x - x.mean(0))) <= 1e-12


def test_data_module_frames_are_a_fresh_source(make_dm: Callable[..., Any]) -> None:
    assert StatisticalTrainer(pipeline=_rx_only(), datamodule=make_dm())._batches(
        "train").fresh is True


def test_too_few_pixels_is_an_error(make_dm: Callable[..., Any]) -> None:
    with pytest.raises(DataValidationError, match=r"training pixels reached data.cube"):
        StatisticalTrainer(pipeline=_rx_only(), datamodule=make_dm(), sample_fraction=1e-9).fit()


# ---------------------------------------------------------------------------- validate
def test_validate_returns_metric_node_keys(make_dm: Callable[..., Any], cubes: Any) -> None:
    pipe = _chain(cubes.channels, eps=1e-6, head=True)
    trainer = StatisticalTrainer(pipeline=pipe, datamodule=make_dm(val_ids=[3, 4]))
    trainer.fit()
    results = trainer.validate()
    assert set(results) == {f"metrics_anomaly/{m}" for m in
                            ("iou", "f1", "precision", "recall", "ap", "auroc")}
    assert all(isinstance(v, float) for v in results.values())
    assert 0.0 <= results["metrics_anomaly/iou"] <= 1.0
    # The planted targets are easy: RX separates them well.
    assert results["metrics_anomaly/auroc"] > 0.9
    # Validation is repeatable (metric state reset between calls).
    assert trainer.validate() == results


def test_validate_needs_a_metric_node(make_dm: Callable[..., Any]) -> None:
    trainer = StatisticalTrainer(pipeline=_rx_only(), datamodule=make_dm())
    trainer.fit()
    with pytest.raises(PipelineError, match="no metric node"):
        trainer.validate()


def test_fit_on_the_bundled_session_one_pass(session_paths: list[Any]) -> None:
    from nodes import CubeDataModule

    class _Counting(CubeDataModule):
        read = 0

        def frame_batches(self, split: str) -> Iterator[Any]:
            for batch in super().frame_batches(split) or ():
                type(self).read += split == "train"
                yield batch

    dm = _Counting(session_paths, train_ids=[0, 1, 2], val_ids=[3], test_ids=[4], batch_size=2)
    pipe = _chain(205, n_select=10, eps=1e-6)
    report = StatisticalTrainer(pipeline=pipe, datamodule=dm).fit()
    assert report.passes == 1 and _Counting.read == 3  # .mat frames, each read once
    assert report.pixels == 3 * 100 * 100
    assert _rx(pipe).is_initialized
