"""The fused-op table, its accessor and writers, and post-op records."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from pyrys.capture.export import capture_module
from pyrys.ir.fused import (FUSED_BY_BASE, FUSED_KINDS, FUSED_OPS, add_post_op, fused_form_miss, read_fused,
                            to_fused)
from pyrys.ir.meta import fresh_meta, meta_mismatch, refresh_meta
from pyrys.ir.ops import PYTHON_IMPLS
from pyrys.ir.post_ops import POST_OPS, PostOp
from pyrys.ir.printer import format_graph
from pyrys.ir.vocabulary import MATRIX_PRODUCTS, WEIGHTED
from pyrys.passes.pipeline import run_pipeline, select_passes
from tests.models import image


def test_every_kind_is_registered_with_its_python_function():
    for kind in FUSED_KINDS:
        assert kind.op in FUSED_OPS and kind.op in PYTHON_IMPLS
        assert [a.name for a in kind.op._schema.arguments] == [*kind.arguments, "post_ops", "post_inputs"]


def test_every_kind_takes_its_aten_ops_arguments_by_the_same_names():
    for kind in FUSED_KINDS:
        for base in kind.bases:
            names = ["input" if a.name == "self" else a.name for a in base._schema.arguments]  # as op_args reads
            assert list(kind.own_args(dict.fromkeys(names))) == list(kind.arguments), base
    assert set(FUSED_BY_BASE) == WEIGHTED | MATRIX_PRODUCTS


CASES = {  # kind -> (its own arguments, the same computation in torch)
    "conv": ((torch.rand(1, 4, 6, 6), torch.rand(6, 2, 3, 3), torch.rand(6), [1, 1], [1, 1], [1, 1], 2),
             F.conv2d),
    "conv_transpose": ((torch.rand(1, 4, 5), torch.rand(4, 3, 3), None, [2], [1], [1], 1, [1]),
                       F.conv_transpose1d),
    "linear": ((torch.rand(3, 5), torch.rand(2, 5), torch.rand(2)), F.linear),
    "matmul": ((torch.rand(2, 3, 5), torch.rand(1, 5, 4)), torch.matmul),
}


@pytest.mark.parametrize("kind", FUSED_KINDS, ids=lambda k: k.name)
def test_the_op_and_its_python_function_compute_the_base_op_then_the_chain(kind):
    args, reference = CASES[kind.name]
    expected = reference(*args)
    other = torch.rand_like(expected)
    post_ops, post_inputs = ["leaky_relu:0.1", "add", "clamp:-1.0,0.5"], [other]
    chained = torch.clamp(F.leaky_relu(expected, 0.1) + other, -1.0, 0.5)
    assert torch.allclose(kind.op(*args, post_ops, post_inputs), chained)
    assert torch.allclose(PYTHON_IMPLS[kind.op](*args, post_ops, post_inputs), chained)
    assert torch.equal(kind.op(*args, [], []), expected)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.same = torch.nn.Conv2d(4, 4, 3, padding="same")

    def forward(self, x, r):
        return self.same(self.conv(x)) + r


def graph() -> fx.GraphModule:
    gm = capture_module(ConvNet().eval(), (image(), torch.rand(1, 4, 4, 4))).gm
    refresh_meta(gm)
    run_pipeline(gm, pipeline=select_passes("freeze_params"))
    return gm


def named(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_to_fused_and_add_post_op_write_what_read_fused_reads():
    gm = graph()
    fused = to_fused(gm, named(gm, "conv2d"))
    add_post_op(fused, PostOp("clamp", (0, 6)))
    add_post_op(fused, PostOp("add"), named(gm, "r"))
    record = read_fused(fused)
    assert record.kind.name == "conv" and record.label == "conv2d_clamp_add"
    assert record.args["weight"].name == "conv_weight" and record.args["padding"] == [0, 0]
    assert record.post_ops == (PostOp("clamp", (0.0, 6.0)), PostOp("add")) and record.post_inputs == (named(gm, "r"),)
    assert fused.args[-2:] == (["clamp:0.0,6.0", "add"], [named(gm, "r")])  # the schema's spelling
    assert "pyrys::conv2d_clamp_add[post_ops=['clamp:0.0,6.0', 'add']](%x, %conv_weight" in format_graph(gm)
    fresh = fresh_meta(gm)
    assert all(meta_mismatch(n.meta.get("val"), fresh[n]) is None for n in fresh)  # the writers kept meta current


def test_to_fused_in_place_keeps_the_node_and_its_name():
    gm = graph()
    conv = named(gm, "conv2d")
    assert to_fused(gm, conv, in_place=True) is conv and conv.name == "conv2d"
    assert read_fused(conv).label == "conv2d" and to_fused(gm, conv) is conv


def test_read_fused_is_none_for_other_ops_and_string_padding_has_no_fused_form():
    gm = graph()
    assert read_fused(named(gm, "conv2d")) is None
    assert fused_form_miss(named(gm, "conv2d")) is None
    assert fused_form_miss(named(gm, "conv2d_1")) == "conv padding='same' is not lowered to explicit padding"


def test_post_op_records_round_trip_through_the_schema_spelling():
    for name, kind in POST_OPS.items():
        post_op = PostOp(name, tuple(0.5 * (i + 1) for i in range(kind.arity)))
        assert PostOp.parse(str(post_op)) == post_op and post_op.binary == kind.binary
    assert str(PostOp("leaky_relu", (0,))) == "leaky_relu:0.0"
    with pytest.raises(ValueError, match="unknown post-op 'nope'"):
        PostOp("nope")
    with pytest.raises(ValueError, match="relu takes 0 parameters, not 1"):
        PostOp.parse("relu:1")
