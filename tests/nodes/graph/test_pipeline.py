"""The typed-port pipeline (nodes/graph/pipeline.py): building, checking, running, saving,
loading."""

from __future__ import annotations

import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from nodes import (
    NODE_REGISTRY,
    AnomalyBCEWithLogits,
    AnomalyDataNode,
    AnomalyDetectionMetrics,
    BinaryDecider,
    ConfigError,
    CubelineError,
    DataValidationError,
    MinMaxNormalizer,
    Node,
    NotInitializedError,
    Pipeline,
    PipelineError,
    PipelineMetadata,
    PortConnectionError,
    RXGlobal,
    ScoreToLogit,
    SoftChannelSelector,
    StatisticalTrainer,
    register_node,
)
from nodes.library.presets import build_channel_selector_pipeline


def _batch(cubes: Any, ids: list[int]) -> dict[str, torch.Tensor]:
    return {
        "cube": torch.from_numpy(__import__("numpy").stack([cubes.cubes[i] for i in ids])),
        "mask": torch.from_numpy(__import__("numpy").stack([cubes.masks[i] for i in ids])),
        "frame_id": torch.tensor(ids),
    }


@pytest.fixture
def fitted(cubes: Any, make_dm: Callable[..., Any]) -> Pipeline:
    """The channel-selector preset (12 bands → 4) after Phase 1 on generated frames."""
    pipe = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    StatisticalTrainer(pipeline=pipe, datamodule=make_dm()).fit()
    return pipe


# ---------------------------------------------------------------------------- connect checks
def test_connect_unknown_port_names_it_and_lists_valid_ones() -> None:
    pipe = Pipeline("p")
    data, rx = AnomalyDataNode(), RXGlobal(num_channels=4, name="rx")
    with pytest.raises(PortConnectionError) as err:
        pipe.connect((data.cube, rx.input))  # RXGlobal's input is "data"
    msg = str(err.value)
    assert "'input'" in msg and "'rx'" in msg and "['data']" in msg and "['scores']" in msg
    pipe.add_node(rx)
    with pytest.raises(PortConnectionError, match=r"'score'.*\['scores'\]"):
        pipe.connect(("rx.score", "rx.data"))  # string form, same message
    with pytest.raises(PortConnectionError, match=r"unknown node 'rxx'.*\['rx'\]"):
        pipe.connect(("rxx.scores", "rx.data"))
    assert pipe.edges == []


def test_connect_rejects_incompatible_dtypes_naming_both_ports() -> None:
    pipe = Pipeline("p")
    decider, head = BinaryDecider(name="decider"), ScoreToLogit(name="head")
    with pytest.raises(PortConnectionError) as err:
        pipe.connect((decider.decisions, head.scores))
    msg = str(err.value)
    assert "decider.decisions" in msg and "head.scores" in msg
    assert "'bool'" in msg and "'float'" in msg
    assert pipe.edges == [] and len(pipe.nodes) == 0


def test_connect_rejects_channel_count_mismatch_naming_both_ports() -> None:
    pipe = Pipeline("p")
    sel = SoftChannelSelector(n_select=10, input_channels=61, name="sel")
    rx = RXGlobal(num_channels=8, name="rx")
    with pytest.raises(PortConnectionError) as err:
        pipe.connect((sel.selected, rx.data))
    msg = str(err.value)
    assert "sel.selected" in msg and "rx.data" in msg and "10" in msg and "8" in msg
    # Matching counts connect.
    pipe.connect((sel.selected, RXGlobal(num_channels=10, name="rx10").data))


def test_connect_rejects_rank_mismatch_and_direction() -> None:
    pipe = Pipeline("p")
    data, head, rx = AnomalyDataNode(), ScoreToLogit(name="head"), RXGlobal(3, name="rx")
    with pytest.raises(PortConnectionError, match=r"data\.cube.*head\.scores"):
        pipe.connect((data.cube, head.scores))
    with pytest.raises(PortConnectionError, match=r"rx.data is an input port"):
        pipe.connect((rx.data, head.scores))
    with pytest.raises(PortConnectionError, match=r"head.logits is an output port"):
        pipe.connect((rx.scores, head.logits))
    with pytest.raises(PortConnectionError, match="pairs"):
        pipe.connect(rx.scores)


def test_connect_rejects_an_input_that_is_already_fed() -> None:
    pipe = Pipeline("p")
    a, b = RXGlobal(3, name="a"), RXGlobal(3, name="b")
    head = ScoreToLogit(name="head")
    pipe.connect((a.scores, head.scores))
    with pytest.raises(PortConnectionError, match=r"head\.scores is already fed by a\.scores"):
        pipe.connect((b.scores, head.scores))
    # Within one call too, and the whole call is rejected: nothing of it is added.
    pipe2 = Pipeline("p2")
    h2 = ScoreToLogit(name="h2")
    d2 = BinaryDecider(name="d2")
    with pytest.raises(PortConnectionError, match="already fed"):
        pipe2.connect((h2.logits, d2.logits), (a.scores, h2.scores), (b.scores, h2.scores))
    assert pipe2.edges == [] and len(pipe2.nodes) == 0


def test_connect_rejects_a_cycle_and_leaves_the_graph_unchanged() -> None:
    pipe = Pipeline("p")
    a, b = ScoreToLogit(name="a"), ScoreToLogit(name="b")
    pipe.connect((a.logits, b.scores))
    # A typo in the wiring must fail where it is written (DESIGN.md §4.4), not at forward time.
    with pytest.raises((PipelineError, PortConnectionError), match=r"cycle.*\ba\b.*\bb\b"):
        pipe.connect((b.logits, a.scores))
    assert [str(e) for e in pipe.edges] == ["a.logits -> b.scores"]
    assert pipe.topological_order() == ["a", "b"]


def test_a_cycle_never_runs() -> None:
    # Whatever connect does, a cyclic graph must not execute.
    pipe = Pipeline("p")
    a, b = ScoreToLogit(name="a"), ScoreToLogit(name="b")
    pipe.connect((a.logits, b.scores))
    try:
        pipe.connect((b.logits, a.scores))
    except PipelineError:
        return
    with pytest.raises(PipelineError, match=r"cycle through nodes \['a', 'b'\]"):
        pipe.topological_order()


def test_duplicate_node_name_and_nodes_lookup() -> None:
    pipe = Pipeline("p")
    rx = RXGlobal(3, name="rx")
    assert pipe.add_node(rx) is rx
    assert pipe.add_node(rx) is rx  # same object again is fine
    assert pipe.nodes["rx"] is rx
    with pytest.raises(PipelineError, match="already has a node named 'rx'"):
        pipe.add_node(RXGlobal(3, name="rx"))
    with pytest.raises(PipelineError, match="expects a Node"):
        pipe.add_node(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- running
def test_topological_execution_whatever_the_insertion_order(cubes: Any) -> None:
    pipe = Pipeline("p")
    data = AnomalyDataNode()
    norm = MinMaxNormalizer(use_running_stats=False, name="norm")
    sel = SoftChannelSelector(3, cubes.channels, init_method="uniform", name="sel")
    # Add downstream nodes first: order must come from the edges, not from insertion.
    pipe.add_node(sel)
    pipe.add_node(norm)
    pipe.connect((norm.normalized, sel.data), (data.cube, norm.data))
    order = pipe.topological_order()
    assert order.index("data") < order.index("norm") < order.index("sel")
    out = pipe.forward(batch=_batch(cubes, [0, 1]))
    x = torch.from_numpy(cubes.cubes[0])
    expect = (x - x.min()) / (x.max() - x.min() + 1e-6) @ sel.selection_matrix().T
    torch.testing.assert_close(out["sel.selected"][0], expect)


def test_forward_returns_node_port_keys(fitted: Pipeline, cubes: Any) -> None:
    batch = _batch(cubes, [3])
    out = fitted.forward(batch=batch)
    assert set(out) == {
        "data.cube", "data.mask", "data.wavelengths", "normalizer.normalized",
        "selector.selected", "selector.weights", "rx.scores", "logit_head.logits",
        "decider.decisions",
    }
    assert out["rx.scores"].shape == (1, 24, 24)
    assert out["decider.decisions"].dtype == torch.bool
    # Positional batch and keyword entries are the same call.
    pos = fitted.forward(batch)
    kw = fitted.forward(cube=batch["cube"], mask=batch["mask"])
    assert torch.equal(pos["rx.scores"], out["rx.scores"])
    assert torch.equal(kw["rx.scores"], out["rx.scores"])


def test_forward_outputs_restricts_to_what_is_needed(fitted: Pipeline, cubes: Any) -> None:
    out = fitted.forward(batch=_batch(cubes, [3]), outputs=["rx.scores"])
    assert set(out) == {"data.cube", "data.mask", "data.wavelengths", "normalizer.normalized",
                        "selector.selected", "selector.weights", "rx.scores"}


def test_execution_stages(fitted: Pipeline, cubes: Any) -> None:
    batch = _batch(cubes, [3])
    metrics = fitted.nodes["metrics_anomaly"]
    assert isinstance(metrics, AnomalyDetectionMetrics)
    metrics.reset()
    inference = fitted.forward(batch=batch, stage="inference")
    assert "bce.loss" not in inference  # losses do not run in inference
    assert "rx.scores" in inference
    train = fitted.forward(batch=batch, stage="train")
    assert "bce.loss" in train and train["bce.loss"].ndim == 0

    def seen() -> int:  # pixels counted by the metric node (tp + fp + tn + fn)
        with warnings.catch_warnings():  # torchmetrics warns on compute() before update()
            warnings.simplefilter("ignore")
            counts: torch.Tensor = metrics.stat_scores.compute()
        return int(counts[:4].sum())

    # Metrics run only in val/test: nothing was counted so far.
    assert seen() == 0
    fitted.forward(batch=batch, stage="val")
    assert seen() == batch["mask"].numel()
    fitted.forward(batch=batch, stage="test")
    assert seen() == 2 * batch["mask"].numel()
    with pytest.raises(PipelineError, match="unknown stage 'eval'"):
        fitted.forward(batch=batch, stage="eval")


def test_custom_execution_stages_and_missing_upstream() -> None:
    with pytest.raises(CubelineError, match="unknown execution stages"):
        ScoreToLogit(name="h", execution_stages=["training"])
    pipe = Pipeline("p")
    data = AnomalyDataNode()
    norm = MinMaxNormalizer(use_running_stats=False, name="norm", execution_stages=["train"])
    sel = SoftChannelSelector(2, 3, init_method="uniform", name="sel")
    pipe.connect((data.cube, norm.data), (norm.normalized, sel.data))
    batch = {"cube": torch.rand(1, 2, 2, 3)}
    assert "sel.selected" in pipe.forward(batch=batch, stage="train")
    with pytest.raises(PipelineError, match=r"'sel'.*norm\.normalized.*'inference'"):
        pipe.forward(batch=batch, stage="inference")


def test_unconnected_required_input_is_an_error() -> None:
    pipe = Pipeline("p")
    data = AnomalyDataNode()
    metrics = AnomalyDetectionMetrics(name="m")
    pipe.connect((data.mask, metrics.targets))
    with pytest.raises(PipelineError, match=r"'m'.*unconnected inputs \['decisions'\]"):
        pipe.forward(batch={"cube": torch.rand(1, 2, 2, 3)}, stage="val")


def test_node_used_before_phase1_says_to_fit(cubes: Any) -> None:
    pipe = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    with pytest.raises(NotInitializedError) as err:
        pipe.forward(batch=_batch(cubes, [0]))
    assert "run StatisticalTrainer.fit() first" in str(err.value)
    assert "'normalizer'" in str(err.value)


def test_data_node_batch_contract() -> None:
    data = AnomalyDataNode(normal_class_ids=[0, 1])
    cube = torch.rand(2, 3, 3, 4)
    cm = torch.zeros(2, 3, 3, dtype=torch.int64)
    cm[0, 0, 0], cm[0, 1, 1], cm[1, 2, 2] = 1, 2, 5
    out = data.run_batch({"cube": cube, "class_mask": cm, "mask": torch.ones(2, 3, 3)})
    # class_mask wins over mask: classes outside normal_class_ids are anomalies.
    assert out["mask"].sum() == 2 and out["mask"][0, 1, 1] and out["mask"][1, 2, 2]
    assert out["wavelengths"].shape == (2, 4)
    assert data.run_batch({"cube": cube})["mask"].sum() == 0
    with pytest.raises(DataValidationError, match="no 'cube'"):
        data.run_batch({"mask": torch.zeros(1, 2, 2)})


# ---------------------------------------------------------------------------- freeze
def test_unfreeze_and_freeze_keep_state_dict_keys(fitted: Pipeline) -> None:
    keys = sorted(fitted.state_dict())  # the set matters (load by key), not the order
    before = {k: v.clone() for k, v in fitted.state_dict().items()}
    assert not any(p.requires_grad for p in fitted.parameters())
    fitted.unfreeze_nodes_by_name(["selector", "rx", "logit_head"])
    assert sorted(fitted.state_dict()) == keys
    assert sorted(fitted.unfrozen_node_names()) == ["logit_head", "rx", "selector"]
    names = {n for n, p in fitted.named_parameters() if p.requires_grad}
    assert names == {"nodes.selector.channel_logits", "nodes.rx.mu", "nodes.rx.cov_factor",
                     "nodes.logit_head.scale", "nodes.logit_head.bias"}
    assert all(torch.equal(v, before[k]) for k, v in fitted.state_dict().items())
    fitted.freeze_nodes_by_name(["selector", "rx", "logit_head"])
    assert sorted(fitted.state_dict()) == keys
    assert fitted.unfrozen_node_names() == []
    assert not any(True for _ in fitted.parameters())


def test_unfreeze_errors(cubes: Any, fitted: Pipeline) -> None:
    with pytest.raises(PipelineError, match=r"unknown nodes \['rx_detector'\]"):
        fitted.unfreeze_nodes_by_name(["rx_detector"])
    with pytest.raises(CubelineError, match="nothing to train"):
        fitted.unfreeze_nodes_by_name(["rx", "decider"])
    assert fitted.unfrozen_node_names() == []  # all or nothing
    fresh = build_channel_selector_pipeline(input_channels=cubes.channels, n_select=4)
    with pytest.raises(NotInitializedError, match=r"StatisticalTrainer.fit"):
        fresh.unfreeze_nodes_by_name(["rx"])


# ---------------------------------------------------------------------------- save / load
def test_save_writes_yaml_and_pt_and_load_gives_identical_scores(
    fitted: Pipeline, cubes: Any, tmp_path: Path
) -> None:
    meta = PipelineMetadata(name="v1", description="test", tags=["a", "b"])
    cfg, weights = fitted.save_to_file(tmp_path / "out" / "model.yaml", metadata=meta)
    assert cfg == tmp_path / "out" / "model.yaml" and weights == tmp_path / "out" / "model.pt"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.pt", "model.yaml"]
    doc = yaml.safe_load(cfg.read_text())
    assert doc["metadata"]["name"] == "v1" and doc["metadata"]["tags"] == ["a", "b"]
    assert doc["metadata"]["created"]
    assert {n["type"] for n in doc["nodes"]} <= set(NODE_REGISTRY)
    loaded = Pipeline.load_from_file(config_path=cfg, weights_path=weights, device="cpu")
    assert list(loaded.nodes) == list(fitted.nodes)
    assert [str(e) for e in loaded.edges] == [str(e) for e in fitted.edges]
    batch = _batch(cubes, [3, 4])
    a, b = fitted.forward(batch=batch), loaded.forward(batch=batch)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The weights path defaults to the YAML's sibling.
    again = Pipeline.load_from_file(cfg)
    assert torch.equal(again.forward(batch=batch)["rx.scores"], a["rx.scores"])


def test_unfrozen_nodes_stay_unfrozen_through_save_load(fitted: Pipeline, tmp_path: Path) -> None:
    fitted.unfreeze_nodes_by_name(["rx"])
    cfg, _ = fitted.save_to_file(tmp_path / "m.yaml")
    loaded = Pipeline.load_from_file(cfg)
    assert loaded.unfrozen_node_names() == ["rx"]
    assert sorted(loaded.state_dict()) == sorted(fitted.state_dict())


def test_per_channel_normalizer_buffers_are_resized_on_load(
    cubes: Any, make_dm: Callable[..., Any], tmp_path: Path
) -> None:
    pipe = Pipeline("pc")
    data = AnomalyDataNode()
    norm = MinMaxNormalizer(per_channel=True, name="norm")
    rx = RXGlobal(num_channels=cubes.channels, name="rx")
    pipe.connect((data.cube, norm.data), (norm.normalized, rx.data))
    StatisticalTrainer(pipeline=pipe, datamodule=make_dm()).fit()
    assert norm.running_min.shape == (cubes.channels,)
    cfg, _ = pipe.save_to_file(tmp_path / "pc.yaml")
    loaded = Pipeline.load_from_file(cfg)
    batch = _batch(cubes, [4])
    assert torch.equal(loaded.forward(batch=batch)["rx.scores"],
                       pipe.forward(batch=batch)["rx.scores"])


def _rewrite(cfg: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = yaml.safe_load(cfg.read_text())
    edit(doc)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_unknown_node_type_in_yaml_names_file_and_type(fitted: Pipeline, tmp_path: Path) -> None:
    cfg, _ = fitted.save_to_file(tmp_path / "m.yaml")
    _rewrite(cfg, lambda d: d["nodes"][3].__setitem__("type", "RXLocal"))
    with pytest.raises(ConfigError) as err:
        Pipeline.load_from_file(cfg)
    msg = str(err.value)
    assert str(cfg) in msg and "'RXLocal'" in msg and "RXGlobal" in msg  # lists known types


def test_unknown_port_in_yaml_names_file_and_connection(fitted: Pipeline, tmp_path: Path) -> None:
    cfg, _ = fitted.save_to_file(tmp_path / "m.yaml")
    _rewrite(cfg, lambda d: d["connections"].__setitem__(2, ["selector.selected", "rx.dat"]))
    with pytest.raises(ConfigError) as err:
        Pipeline.load_from_file(cfg)
    msg = str(err.value)
    assert str(cfg) in msg and "connections[2]" in msg and "'dat'" in msg


def test_bad_node_config_and_bad_yaml(fitted: Pipeline, tmp_path: Path) -> None:
    cfg, _ = fitted.save_to_file(tmp_path / "m.yaml")
    _rewrite(cfg, lambda d: d["nodes"][3]["config"].__setitem__("n_channels", 3))
    with pytest.raises(ConfigError, match=r"m\.yaml.*'rx'"):
        Pipeline.load_from_file(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml"):
        Pipeline.load_from_file(bad)
    other = tmp_path / "other.yaml"
    other.write_text("just: a mapping\n")
    with pytest.raises(ConfigError, match=r"other.yaml.*not a cubeline pipeline"):
        Pipeline.load_from_file(other)
    with pytest.raises(ConfigError, match="does not exist"):
        Pipeline.load_from_file(tmp_path / "missing.yaml")


class _Payload:
    """A custom class: pickling it into a weights file must not be loadable."""

    def __init__(self) -> None:
        self.x = 1


def test_weights_that_fail_weights_only_loading(fitted: Pipeline, tmp_path: Path) -> None:
    cfg, weights = fitted.save_to_file(tmp_path / "m.yaml")
    state = torch.load(weights, weights_only=True)
    state["nodes.rx.mu"] = _Payload()
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    with pytest.raises(ConfigError) as err:
        Pipeline.load_from_file(cfg, weights_path=evil)
    assert "evil.pt" in str(err.value) and "weights_only" in str(err.value)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"trunc.pt"):
        Pipeline.load_from_file(cfg, weights_path=truncated)
    with pytest.raises(ConfigError, match=r"missing.pt does not exist"):
        Pipeline.load_from_file(cfg, weights_path=tmp_path / "missing.pt")


def test_weights_that_do_not_match_the_graph(fitted: Pipeline, tmp_path: Path) -> None:
    cfg, weights = fitted.save_to_file(tmp_path / "m.yaml")
    state = torch.load(weights, weights_only=True)
    del state["nodes.rx.mu"]
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(ConfigError, match=r"partial\.pt.*missing \['nodes\.rx\.mu'\]"):
        Pipeline.load_from_file(cfg, weights_path=partial)
    state = torch.load(weights, weights_only=True)
    state["nodes.rx.mu"] = torch.zeros(7, dtype=torch.float64)
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    with pytest.raises(ConfigError, match=r"wrong\.pt.*nodes\.rx\.mu.*\(7,\).*\(4,\)"):
        Pipeline.load_from_file(cfg, weights_path=wrong)


def test_node_classes_come_from_the_registry_never_from_the_file(
    fitted: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported.txt"
    (tmp_path / "cubeline_evil_mod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        from nodes.library.heads import ScoreToLogit as Evil
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg, _ = fitted.save_to_file(tmp_path / "m.yaml")
    evil = ("cubeline_evil_mod.Evil", "cubeline_evil_mod:Evil", "nodes.library.rx.RXGlobal")
    for type_name in evil:

        def retype(d: dict[str, Any], t: str = type_name) -> None:
            d["nodes"][4]["type"] = t

        _rewrite(cfg, retype)
        with pytest.raises(ConfigError, match="unknown node type"):
            Pipeline.load_from_file(cfg)
    assert not marker.exists()
    assert "cubeline_evil_mod" not in sys.modules


def test_registry_refuses_a_second_class_under_a_taken_name() -> None:
    before = dict(NODE_REGISTRY)

    class RXGlobal(Node):  # same name as the real one
        pass

    with pytest.raises(ConfigError, match="already registered"):
        register_node(RXGlobal)
    assert before == NODE_REGISTRY


# ---------------------------------------------------------------------------- the guide
def test_guide_example_runs_as_written_on_the_bundled_session(
    session_paths: list[Path], tmp_path: Path
) -> None:
    """DESIGN.md §2 with our imports and the bundled data, up to Phase 1 and save/load."""
    from nodes import CubeDataModule  # the public import path of DESIGN.md §2

    dm = CubeDataModule(session_paths, train_ids=[0, 1, 2], val_ids=[3], test_ids=[4],
                        batch_size=2)
    pipeline = Pipeline("Channel_Selector")
    data_node = AnomalyDataNode(normal_class_ids=[0])
    normalizer = MinMaxNormalizer(eps=1e-6, use_running_stats=True)
    selector = SoftChannelSelector(n_select=10, input_channels=205, init_method="variance")
    rx_node = RXGlobal(num_channels=10, eps=1e-6)
    logit_head = ScoreToLogit(init_scale=1.0, init_bias=0.0)
    decider = BinaryDecider(threshold=0.5)
    bce_loss = AnomalyBCEWithLogits(name="bce", weight=10.0)
    metrics_node = AnomalyDetectionMetrics(name="metrics_anomaly")
    pipeline.connect(
        (data_node.cube, normalizer.data), (normalizer.normalized, selector.data),
        (selector.selected, rx_node.data), (rx_node.scores, logit_head.scores),
        (logit_head.logits, bce_loss.predictions), (data_node.mask, bce_loss.targets),
        (logit_head.logits, decider.logits), (decider.decisions, metrics_node.decisions),
        (data_node.mask, metrics_node.targets),
    )
    stat_trainer = StatisticalTrainer(pipeline=pipeline, datamodule=dm)
    stat_trainer.fit()
    assert pipeline.nodes[rx_node.name]._statistically_initialized
    assert rx_node.mu.shape == (10,) and rx_node.sigma.shape == (10, 10)
    val_results = stat_trainer.validate()
    assert 0.0 <= val_results["metrics_anomaly/iou"] <= 1.0
    pipeline.unfreeze_nodes_by_name([selector.name, rx_node.name, logit_head.name])
    trainable = sum(p.numel() for p in pipeline.parameters() if p.requires_grad)
    assert trainable == 10 * 205 + 10 + 10 * 10 + 2
    pipeline.save_to_file(tmp_path / "out" / "model.yaml", metadata=PipelineMetadata(name="v1"))
    p2 = Pipeline.load_from_file(config_path=tmp_path / "out" / "model.yaml",
                                 weights_path=tmp_path / "out" / "model.pt", device="cpu")
    batch = next(iter(dm.test_dataloader()))
    out, ref = p2.forward(batch=batch), pipeline.forward(batch=batch)
    key = f"{rx_node.name}.scores"
    assert key in out and out[key].shape == (1, 100, 100)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


# ------------------------------------------------------- default names and lone nodes (issue 11)


def test_default_names_are_numbered_on_a_clash_and_explicit_ones_refused() -> None:
    p = Pipeline()
    first, second = RXGlobal(num_channels=3), RXGlobal(num_channels=3)
    p.add_node(first)
    p.add_node(second)
    assert (first.name, second.name) == ("rx_detector", "rx_detector_2")
    # connect() numbers new nodes the same way, before any edge is added.
    sel_a = SoftChannelSelector(2, 4, init_method="uniform")
    sel_b = SoftChannelSelector(2, 4, init_method="uniform")
    q = Pipeline()
    q.connect((MinMaxNormalizer(use_running_stats=False).normalized, sel_a.data))
    q.connect(("normalizer.normalized", sel_b.data))
    assert sorted(q.nodes) == ["normalizer", "selector", "selector_2"]
    with pytest.raises(PipelineError, match=r"already has a node named 'rx_detector'.*name=\.\.\."):
        p.add_node(RXGlobal(num_channels=3, name="rx_detector"))


def test_a_failed_connect_renames_nothing() -> None:
    p = Pipeline()
    p.add_node(RXGlobal(num_channels=3))
    other, head = RXGlobal(num_channels=4), ScoreToLogit(standardize=False)
    with pytest.raises(PortConnectionError):
        p.connect((other.scores, head.scores), (SoftChannelSelector(2, 4).selected, other.data))
    assert other.name == "rx_detector" and list(p.nodes) == ["rx_detector"]


def test_a_lone_node_reads_the_batch_cube_only_without_a_data_node() -> None:
    p = Pipeline()
    rx = RXGlobal(num_channels=3, eps=0.0)
    p.add_node(rx)
    assert p.implicit_cube_inputs() == ["rx_detector"]
    cube = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    rx.mu = cube.reshape(-1, 3).mean(0)
    rx.sigma = torch.cov(cube.reshape(-1, 3).T)
    out = p.forward({"cube": cube})
    assert torch.equal(out["batch.cube"], cube) and out["rx_detector.scores"].shape == (2, 4, 5)
    with pytest.raises(PipelineError, match=r"have no connection into their 'data' input.*'cube'"):
        p.forward({"mask": torch.zeros(2, 4, 5)})
    p.add_node(AnomalyDataNode())  # now the cube has an explicit source: connect it
    assert p.implicit_cube_inputs() == []
    with pytest.raises(PipelineError, match=r"unconnected inputs \['data'\]"):
        p.forward({"cube": cube})
