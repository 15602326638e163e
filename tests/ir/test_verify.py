"""The verifier on broken graphs: each one fails with a message that names the problem."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from pyrys.capture.export import capture_module
from pyrys.ir.fused import FUSED_OPS
from pyrys.ir.meta import refresh_meta
from pyrys.ir.verify import VerificationError, make_verifier, output_types
from pyrys.passes.pipeline import Instruments, Pass, run_pipeline, select_passes
from tests.models import image


class ConvRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x)) * 2.0


def captured(*passes: str) -> fx.GraphModule:
    """The frozen ConvRelu graph (after ``passes``), its meta propagated."""
    gm = capture_module(ConvRelu().eval(), (image(),)).gm
    refresh_meta(gm)
    run_pipeline(gm, pipeline=select_passes("freeze_params", *passes))
    return gm


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def verify(gm: fx.GraphModule, outputs: list[tuple] | None = None) -> None:
    make_verifier(outputs if outputs is not None else output_types(gm))(gm)


def test_a_sound_graph_passes():
    verify(captured())
    verify(captured("fuse_post_ops"))


def test_wrong_shape_meta_names_the_node_and_both_shapes():
    gm = captured()
    outputs = output_types(gm)
    node(gm, "conv2d").meta["val"] = torch.empty(1, 4, 9, 9)
    with pytest.raises(VerificationError, match=r"%conv2d \(aten::conv2d\) records float32\(1, 4, 9, 9\) "
                                                r"where float32\(1, 4, 4, 4\) is computed"):
        verify(gm, outputs)


def test_wrong_dtype_meta_names_the_node():
    gm = captured()
    node(gm, "relu").meta["val"] = torch.empty(1, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(VerificationError, match=r"%relu \(aten::relu\) records float64\(1, 4, 4, 4\)"):
        verify(gm)


def test_wrong_strides_are_a_mismatch_but_strides_of_size_one_dims_are_not():
    gm = captured()
    node(gm, "relu").meta["val"] = torch.empty(1, 4, 4, 4).to(memory_format=torch.channels_last)
    with pytest.raises(VerificationError, match=r"%relu .* records strides \(64, 1, 16, 4\) where "
                                                r"\(64, 16, 4, 1\) are computed"):
        verify(gm)
    node(gm, "relu").meta["val"] = torch.empty_strided((1, 4, 4, 4), (999, 16, 4, 1))
    verify(gm)


def test_a_use_before_its_definition():
    gm = captured()
    node(gm, "conv2d").prepend(node(gm, "relu"))
    with pytest.raises(VerificationError, match="malformed graph: .*used before it has been defined"):
        verify(gm)


def test_an_unknown_op():
    gm = captured()
    node(gm, "relu").target = torch.relu  # a Python function, not an op overload
    with pytest.raises(VerificationError, match=r"%relu calls <built-in method relu .*not an op overload"):
        verify(gm)


def test_a_missing_meta():
    gm = captured()
    del node(gm, "relu").meta["val"]
    with pytest.raises(VerificationError, match=r"%relu has no shape/dtype"):
        verify(gm)


def fused_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target in FUSED_OPS)


@pytest.mark.parametrize("post_ops, post_inputs, problem", [
    (["swish"], [], r"unknown post-op 'swish'"),
    (["clamp"], [], r"malformed post-op 'clamp': clamp takes 2 parameters, not 0"),
    (["clamp:0,x"], [], r"malformed post-op 'clamp:0,x'"),
    (["add"], [], r"1 binary post-ops but 0 operands"),
    (["relu"], ["x"], r"0 binary post-ops but 1 operands"),
    ([1.0], [], r"a post-op is written as a string, not 1.0"),
])
def test_a_fused_op_with_a_malformed_post_op_list(post_ops, post_inputs, problem):
    gm = captured("fuse_post_ops")
    fused = fused_node(gm)
    operands = [node(gm, "x") for _ in post_inputs]
    fused.args = (*fused.args[:-2], post_ops, operands)
    with pytest.raises(VerificationError, match=rf"%{fused.name}: .*{problem}"):
        verify(gm)


def test_a_fused_op_with_too_few_arguments():
    gm = captured("fuse_post_ops")
    fused = fused_node(gm)
    fused.args = fused.args[:3] + fused.args[-2:]
    with pytest.raises(VerificationError, match=rf"%{fused.name}: pyrys::conv takes \(input, weight, bias, stride"):
        verify(gm)


def test_outputs_that_change_type():
    gm = captured()
    with pytest.raises(VerificationError, match="outputs changed type"):
        verify(gm, [((1, 4, 5, 5), torch.float32)])


def _break_relu_meta(gm: fx.GraphModule, options) -> object:
    from pyrys.passes.rewrite import PassResult

    relu = node(gm, "relu")
    relu.meta["val"] = torch.empty(2, *relu.meta["val"].shape[1:])
    return PassResult()


def test_the_pipeline_names_the_pass_whose_meta_is_wrong_and_does_not_repair_it():
    gm = capture_module(ConvRelu().eval(), (image(),)).gm
    refresh_meta(gm)
    instruments = Instruments(verify=make_verifier(output_types(gm)))
    pipeline = select_passes("freeze_params") + (Pass("breaks_meta", _break_relu_meta),)
    with pytest.raises(VerificationError, match=r"after breaks_meta: %relu \(aten::relu\) records float32\(2, 4, 4, 4\)"):
        run_pipeline(gm, instruments=instruments, pipeline=pipeline)
