"""Typed ports (nodes/graph/ports.py) and the port access of nodes (nodes/graph/base.py)."""

from __future__ import annotations

import pytest

from nodes import PortConnectionError, PortSpec, RXGlobal, SoftChannelSelector
from nodes.graph.ports import DTYPE_FAMILIES, PortRef, dtypes_compatible
from nodes.library.heads import ScoreToLogit


def test_port_spec_rejects_unknown_dtype_family() -> None:
    with pytest.raises(ValueError, match="unknown dtype family 'float32'"):
        PortSpec("float32", ("B",))
    for fam in DTYPE_FAMILIES:
        assert PortSpec(fam, ("B",)).dtype == fam


@pytest.mark.parametrize(
    ("out", "inp", "ok"),
    [
        ("float", "float", True),
        ("bool", "bool", True),
        ("float", "bool", False),
        ("bool", "float", False),
        ("int", "float", False),
        ("any", "bool", True),
        ("float", "any", True),
    ],
)
def test_dtype_compatibility(out: str, inp: str, ok: bool) -> None:
    assert dtypes_compatible(out, inp) is ok


def test_ports_are_class_level_specs() -> None:
    # Declared once on the class; every instance shares the same spec objects.
    a, b = RXGlobal(num_channels=3, name="a"), RXGlobal(num_channels=5, name="b")
    assert a.data.spec is b.data.spec is RXGlobal.INPUT_SPECS["data"]
    assert RXGlobal.OUTPUT_SPECS["scores"].dtype == "float"
    assert RXGlobal.INPUT_SPECS["data"].description


def test_port_ref_of_a_node() -> None:
    rx = RXGlobal(num_channels=7, name="rx")
    ref = rx.scores
    assert isinstance(ref, PortRef)
    assert ref.node is rx and ref.name == "scores" and ref.is_output
    assert not rx.data.is_output
    assert ref.qualified == "rx.scores"
    # Attribute-named dims resolve to the instance's value; batch/space dims stay symbolic.
    assert rx.data.resolved_dims() == ("B", "H", "W", 7)
    sel = SoftChannelSelector(n_select=2, input_channels=9, init_method="uniform")
    assert sel.selected.resolved_dims() == ("B", "H", "W", 2)
    assert sel.data.resolved_dims() == ("B", "H", "W", 9)
    assert "rx.data" in repr(rx.data) and "input" in repr(rx.data) and "7" in repr(rx.data)


def test_unknown_port_names_the_port_and_lists_valid_ones() -> None:
    head = ScoreToLogit(name="head")
    with pytest.raises(PortConnectionError) as err:
        _ = head.logit  # typo of "logits"
    msg = str(err.value)
    assert "'logit'" in msg and "'head'" in msg
    assert "['logits']" in msg and "['scores']" in msg
    # Also an AttributeError, so hasattr/getattr(default) keep working.
    assert not hasattr(head, "logit")
    assert getattr(head, "nope", 42) == 42


def test_default_names_are_the_guides() -> None:
    assert ScoreToLogit().name == "logit_head"
    assert SoftChannelSelector(2, 4, init_method="uniform").name == "selector"
    assert ScoreToLogit(name="custom").name == "custom"
