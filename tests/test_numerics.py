"""Numerics you can see: the error after every pass, the first pass over a tolerance, per-layer errors."""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import pyrys
import pyrys.passes.fold_batch_norm as fold_batch_norm
from pyrys import numerics
from pyrys import precision_notes
from pyrys.ir.edit import insert_op, set_args
from pyrys.ir.vocabulary import CONVOLUTIONS
from pyrys.numerics import BF16_TOLERANCE, FP32_TOLERANCE
from pyrys.numerics.bisect import graph_change, locate
from pyrys.numerics.layers import LayerError
from pyrys.numerics.report import NumericsReport
from pyrys.passes import pipeline
from pyrys.passes.pipeline import Pass, Step
from pyrys.passes.rewrite import PassResult
from pyrys.testing import torchvision_model
from tests.caller_helpers import images, residual_net, run_together
from tests.conftest import TOLERANCE, spy_dynamo_graphs
from tests.models import conv_bn_relu, image

aten = torch.ops.aten


def stages(report: NumericsReport) -> list[str]:
    return [name for name, _ in report.rows]


def scale_first_conv_weight(monkeypatch, factor: float = 1.01) -> None:
    """A wrong rewrite planted in ``fold_conv_bn``: after folding, the first conv's weight is scaled by ``factor``."""
    original = fold_batch_norm.fold_conv_bn

    def wrong(gm):
        result = original(gm)
        conv = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONVOLUTIONS)
        with gm.graph.inserting_before(conv):
            scaled = insert_op(gm.graph, aten.mul.Tensor, (conv.args[1], factor))
        set_args(conv, (conv.args[0], scaled, *conv.args[2:]))
        return result

    monkeypatch.setattr(fold_batch_norm, "fold_conv_bn", wrong)


def test_bisect_names_a_planted_wrong_rewrite(monkeypatch, backend):
    scale_first_conv_weight(monkeypatch)
    found = pyrys.bisect(residual_net(), tuple(images(1, seed=0)), backend=backend)
    assert found.stage == "fold_conv_bn"
    assert 1e-3 < found.error < 0.1 and found.error_before <= TOLERANCE
    assert any(line.startswith("+ %mul") and "aten::mul" in line for line in found.changed)
    assert any(line.startswith("- %batch_norm ") for line in found.changed)
    text = found.render()
    assert text.startswith("first over 1e-04: step 8, fold_conv_bn") and "what fold_conv_bn changed in the graph:" in text


def test_bisect_names_a_pass_planted_in_the_pipeline(monkeypatch):
    """A test-only pass after constant propagation scales one folded conv weight (a constant) by 1.01."""

    def scale_a_folded_weight(gm, options) -> PassResult:
        conv = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONVOLUTIONS)
        weight = conv.args[1]
        setattr(gm, weight.target, getattr(gm, weight.target) * 1.01)
        return PassResult(Counter(scaled=1))

    monkeypatch.setattr(pipeline, "PIPELINE", (*pipeline.PIPELINE, Pass("scale_a_folded_weight", scale_a_folded_weight)))
    found = pyrys.bisect(residual_net(), tuple(images(1, seed=0)), backend="reference")
    assert (found.stage, found.index, found.changed) == ("scale_a_folded_weight", len(pipeline.PIPELINE), [])
    assert "left the graph's text as it was: it changed the values of constants" in found.render()


def test_bisect_of_a_correct_compile_names_nothing(backend):
    found = pyrys.bisect(residual_net(), tuple(images(1, seed=0)), backend=backend)
    assert found.stage is None and found.render().startswith("every stage within 1e-04")
    assert pyrys.bisect(residual_net(), tuple(images(1, seed=0)), tolerance=0.0, backend=backend).stage is not None


def test_every_pass_of_a_torchvision_model_within_the_tolerance(backend):
    model = torchvision_model("resnet18")
    opt = pyrys.optimize(model, (torch.rand(1, 3, 64, 64),), backend=backend, numerics=True)
    report = opt.numerics
    assert stages(report) == [step.name for step in opt.history] + [f"program ({backend})"]
    assert all(0 <= error <= TOLERANCE for _, error in report.rows), report.render()
    assert [step.error for step in opt.history] == [error for _, error in report.passes]
    assert report.passes[0] == ("capture", 0.0)  # the captured graph computes what eager does
    # every conv (20) and pooling, flatten and linear has a twin; the worst layer is first
    assert len(report.layers) >= 20 and not report.problems and not report.unmatched
    assert all(layer.error <= TOLERANCE for layer in report.layers)
    assert [layer.error for layer in report.layers] == sorted((layer.error for layer in report.layers), reverse=True)
    assert report.first_over() is None and "numerics: max relative error" in opt.report()
    for tolerance in (-1, float("nan"), "1e-4"):  # a negative one found the capture over it
        with pytest.raises(ValueError, match="NumericsReport.first_over: tolerance must be a non-negative number"):
            report.first_over(tolerance)


def test_layers_name_the_captured_value_they_compute(backend):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, numerics=True)
    (layer,) = opt.numerics.layers
    assert layer.op == "pyrys::conv2d_relu" and layer.computes == "relu"
    assert layer.absorbed[-3:] == ("conv2d", "batch_norm", "relu")
    assert layer.describe().endswith("= %relu (+ %conv2d, %batch_norm)")
    assert opt.numerics.layer("relu") is layer and opt.numerics.layer(layer.node) is layer
    assert opt.numerics.layer("%relu") is layer  # as the report prints it (a helper's find: "no op %%relu")
    with pytest.raises(KeyError, match="%batch_norm has no value of its own .* folded or fused into"):
        opt.numerics.layer("batch_norm")
    with pytest.raises(KeyError, match="no op %nothing"):
        opt.numerics.layer("nothing")
    for layers in (-1, "3", 1.5, True):  # -1 listed none under "1 compared"; "3" raised slice's TypeError
        with pytest.raises(ValueError, match="layers is how many of the worst layers to list"):
            opt.numerics.render(layers=layers)
    assert "= %relu" in opt.numerics.render(layers=1) and "= %relu" not in opt.numerics.render(layers=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_layer_computing_the_output_has_the_outputs_error(backend, precision):
    """bf16: the last linear's layer said 3.8e-3 where the program's output erred 2.8e-3: made an output of the
    probe program, its bfloat16 value was written and converted, where the program writes float32 at once (a
    helper's find). A node read only by its conversion is measured at the conversion."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval(), torch.randn(4, 64)
    opt = pyrys.optimize(model, (x,), backend=backend, precision=precision, numerics=True)
    with torch.no_grad():
        error = pyrys.relative_error(opt(x), model(x))
    assert opt.numerics.layer("linear_1").error == pytest.approx(error, rel=1e-3, abs=1e-9), opt.numerics.render()
    assert opt.numerics.backend_error == pytest.approx(error, rel=1e-3, abs=1e-9)


def test_a_probe_program_with_fallbacks_and_view_outputs(backend):
    """The probe program returns every layer: torch fallbacks, views of computed tensors and graph outputs too."""
    for view in ("slice", "narrow", "index"):
        model = residual_net(view=view, fallback="flip")
        opt = pyrys.optimize(model, tuple(images(1, seed=1)), backend=backend, numerics=True)
        assert opt.numerics.first_over() is None, opt.numerics.render()
        assert {layer.op for layer in opt.numerics.layers} >= {"aten::flip", "aten::max_pool2d"}
        assert all(layer.error <= TOLERANCE for layer in opt.numerics.layers)
        x = images(1, seed=2)[0]
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE  # the program itself is untouched


class Planted(nn.Module):
    """Keyword inputs, a dict output with an integer leaf."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4)

    def forward(self, x, *, scale):
        y = self.linear(x) * scale
        return {"y": torch.relu(y), "argmax": y.argmax(-1)}


def test_keyword_inputs_and_a_dict_output_with_an_integer_leaf(backend):
    model = Planted().eval()
    opt = pyrys.optimize(model, (torch.randn(3, 6),), {"scale": torch.tensor(2.0)}, backend=backend, numerics=True)
    assert opt.numerics.first_over() is None, opt.numerics.render()


@pytest.mark.parametrize("way", ["TorchScript", "ExportedProgram", "torch.compile", "dynamic"])
def test_every_way_in_is_measured(way, backend, monkeypatch):
    model, x = conv_bn_relu(), image()
    if way == "TorchScript":
        opt = pyrys.optimize(torch.jit.script(model), (x,), backend=backend, numerics=True)
    elif way == "ExportedProgram":
        opt = pyrys.optimize(torch.export.export(model, (x,)), backend=backend, numerics=True)
    elif way == "dynamic":
        opt = pyrys.optimize(model, (x,), backend=backend, numerics=True, dynamic=True)
    else:
        graphs = spy_dynamo_graphs(monkeypatch)
        torch.compile(model, backend="pyrys", options={"backend": backend, "numerics": True})(x)
        (opt,) = graphs[0].programs.values()
    report = opt.numerics
    assert report.rows[0][0] == "capture" and report.rows[-1][0] == f"program ({backend})"
    assert report.first_over() is None and len(report.layers) == 1, report.render()


def test_torch_compile_logs_the_report(backend, caplog):
    torch._dynamo.reset()  # a graph dynamo compiled in an earlier test would be reused without a new compile
    with caplog.at_level(logging.INFO, logger="pyrys"):
        torch.compile(conv_bn_relu(), backend="pyrys", options={"backend": backend, "numerics": True})(image())
    assert "numerics: max relative error against eager" in caplog.text


@pytest.mark.parametrize("way", ["nn.Module", "ExportedProgram", "TorchScript"])
def test_the_eager_run_writes_nothing_of_the_users_model(way, backend):
    model = conv_bn_relu().train()  # BatchNorm in training mode updates its running statistics
    source = {"nn.Module": lambda: model, "TorchScript": lambda: torch.jit.script(model),
              "ExportedProgram": lambda: torch.export.export(model, (image(batch=2),))}[way]()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimizing a model in training mode warns
        opt = pyrys.optimize(source, (image(batch=2),), backend=backend, numerics=True)
    assert [name for name, t in model.state_dict().items() if not torch.equal(before[name], t)] == []
    assert opt.numerics.first_over() is None, opt.numerics.render()
    if way == "nn.Module":
        opt(image(batch=3))  # a new shape is captured again: the model was not written, so no ModelChangedError


def test_off_by_default_and_kept_by_save(backend, tmp_path):
    plain = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend)
    assert plain.numerics is None and all(step.error is None for step in plain.history)
    assert "numerics" not in plain.report() and "[error" not in plain.report()
    measured = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, numerics=True)
    assert "[error " in measured.report()
    pyrys.save(measured, tmp_path / "m")
    loaded = pyrys.load(tmp_path / "m")
    assert [s.error for s in loaded.history] == [s.error for s in measured.history]
    assert loaded.numerics is None  # a loaded program has no model to measure against


def test_numerics_must_be_a_bool():
    with pytest.raises(ValueError, match="numerics must be True or False"):
        pyrys.optimize(conv_bn_relu(), (image(),), numerics="yes")
    with pytest.raises(ValueError, match="tolerance must be a non-negative number"):
        pyrys.bisect(conv_bn_relu(), (image(),), tolerance=-1)
    with pytest.raises(ValueError, match="pyrys.explain: tolerance must be a non-negative number"):
        pyrys.explain(conv_bn_relu(), (image(),), numerics=True, tolerance="small")


def test_explain_with_numerics_shows_the_table_and_the_first_stage_over(monkeypatch):
    plain = pyrys.explain(conv_bn_relu(), (image(),), numerics=True).render()
    assert "numerics: max relative error" in plain and "first over" not in plain
    scale_first_conv_weight(monkeypatch)
    text = pyrys.explain(conv_bn_relu(), (image(),), numerics=True).render()
    assert "fold_conv_bn" in text and "<- over the tolerance" in text
    assert "first over 1e-04: step 8, fold_conv_bn" in text


def test_the_tolerance_is_that_of_what_runs(monkeypatch):
    """A bfloat16 model rounds every op (fold_conv_bn's folded weights were flagged at 3e-3 against 1e-4);
    bf16 asked for where the CPU has none runs float32, and explain judged it by bf16's 3e-2."""
    model = conv_bn_relu().to(torch.bfloat16)
    half = pyrys.explain(model, (image().to(torch.bfloat16),), numerics=True)
    assert half.numerics.tolerance == BF16_TOLERANCE and "over the tolerance" not in half.render()
    monkeypatch.setattr(precision_notes, "native_bf16", lambda: False)
    emulated = pyrys.explain(conv_bn_relu(), (image(),), numerics=True, precision="bf16")
    assert emulated.numerics.tolerance == FP32_TOLERANCE
    assert pyrys.explain(conv_bn_relu(), (image(),), numerics=True, tolerance=0).numerics.tolerance == 0
    int8 = pyrys.bisect(conv_bn_relu(), (image(),), precision="int8", calibration=[image(), image() * 2])
    assert int8.stage is None and "every stage within 5e-02" in int8.render()  # 1e-4 named quantize


def test_a_precision_nothing_runs_in_is_not_the_tolerance():
    """bf16 whose guard kept every op in float32, int8 of a model with no op it quantizes: float32 ran, and a
    float32 fault of 1e-3 hid under the 3e-2 or 5e-2 asked for."""
    pointwise = nn.Sequential(nn.ReLU(), nn.Hardswish()).eval()
    int8 = pyrys.optimize(pointwise, (image(),), precision="int8", calibration=[image()], numerics=True)
    assert int8.numerics.tolerance == FP32_TOLERANCE, int8.notes
    if precision_notes.native_bf16():
        kept = pyrys.optimize(conv_bn_relu(), (image(),), precision="bf16", accuracy_budget=1e-9, numerics=True)
        assert "BFloat16" not in kept.graph and kept.numerics.tolerance == FP32_TOLERANCE
        ran = pyrys.optimize(conv_bn_relu(), (image(),), precision="bf16", numerics=True)
        assert ran.numerics.tolerance == BF16_TOLERANCE


def test_explain_cli_numerics(capsys):
    from pyrys.cli import main

    assert main(["explain", "tests.models:conv_bn_relu", "--input-shape", "1x3x6x6", "--numerics"]) == 0
    out = capsys.readouterr().out
    assert "program (reference)" in out and "pyrys::conv2d_relu = %relu" in out and "first over" not in out
    assert main(["explain", "tests.models:conv_bn_relu", "--input-shape", "1x3x6x6", "--numerics",
                 "--tolerance", "0"]) == 0
    assert "first over 0e+00: step 8, fold_conv_bn" in capsys.readouterr().out  # folding rounds differently


def test_locate_names_the_program_and_its_layers_over():
    layers = [LayerError("conv2d_2", "pyrys::conv2d", "conv2d_1", ("conv2d_1",), 3e-3),
              LayerError("conv2d_3", "pyrys::conv2d_relu", "relu", ("conv2d", "relu"), 1e-6)]
    report = NumericsReport(1e-4, [("capture", 0.0), ("simplify", 1e-7)], "dnnl", 2e-3, layers)
    history = [Step("capture", "a", {}, [], 0.0, 0.0), Step("simplify", "a", {}, [], 0.0, 1e-7)]
    found = locate(history, report)
    assert (found.stage, found.error, found.error_before) == ("program (dnnl)", 2e-3, 1e-7)
    assert found.layers == layers[:1] and "%conv2d_2 pyrys::conv2d = %conv2d_1" in found.render()
    nan = NumericsReport(1e-4, [("capture", float("nan"))], "dnnl", 0.0)
    assert locate(history, nan).stage == "capture"  # a graph that gave no number is not within anything


def test_graph_change_lists_removed_then_added_lines():
    before = "graph(%x):\n  %a = f(%x)\n  %b = g(%a)\n  return (%b)"
    after = "graph(%x):\n  %a = f(%x)\n  %b = h(%a)\n  return (%b)"
    assert graph_change(before, after) == ["- %b = g(%a)", "+ %b = h(%a)"]


def test_bisect_from_many_threads_at_once(backend):
    """Public callables are safe from many threads: four bisects of one model agree, and the model is untouched."""
    model = residual_net()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    results = run_together([lambda: pyrys.bisect(model, tuple(images(1, seed=0)), backend=backend)
                            for _ in range(4)])
    assert all(found.stage is None for found in results)
    assert len({tuple(error for _, error in found.report.rows) for found in results}) == 1
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


class WritesItsInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.calls, self.linear = 0, nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        return self.linear(x) * self.calls


def test_measuring_writes_neither_the_inputs_nor_what_is_compiled(backend):
    x = torch.ones(2, 3)
    opt = pyrys.optimize(WritesItsInput().eval(), (x,), backend=backend, numerics=True)
    assert torch.equal(x, torch.ones(2, 3)) and opt.numerics.first_over() is None, opt.numerics.render()
    counted, plain = CountsCalls().eval(), CountsCalls().eval()
    x = torch.randn(2, 4)
    measured = pyrys.optimize(counted, (x,), backend=backend, numerics=True)
    assert torch.equal(measured(x), pyrys.optimize(plain, (x,), backend=backend)(x))  # the same program
    assert counted.calls == 0 and measured.numerics.first_over() is None, measured.numerics.render()


class EdgeValues(nn.Module):
    """An empty output, and -inf where eager has -inf (a causal mask)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        mask = torch.ones(4, 4, dtype=torch.bool).triu(1)
        return y[:, :0], y.masked_fill(mask, float("-inf"))


def test_empty_outputs_and_matching_infinities_agree(backend):
    opt = pyrys.optimize(EdgeValues().eval(), (torch.randn(4, 4),), backend=backend, numerics=True)
    assert opt.numerics.first_over() is None, opt.numerics.render()
    assert pyrys.relative_error(torch.tensor([float("inf"), 1.0]), torch.tensor([float("inf"), 1.0])) == 0
    nan, one = torch.tensor([float("nan"), 1.0]), torch.tensor([2.0, 1.0])
    assert pyrys.relative_error(nan, one) == pyrys.relative_error(one, nan) == float("inf")  # not silent
    assert pyrys.relative_error([one, nan], [one, one]) == pyrys.relative_error([nan, one], [one, one]) == float("inf")
    inf, big = float("inf"), torch.tensor([1e308], dtype=torch.float64)  # a helper's fuzz: 1.8e308, and 1.797
    assert pyrys.relative_error(torch.tensor([-inf, 1.0]), torch.tensor([inf, 1.0])) == inf
    assert pyrys.relative_error(torch.tensor([5.0, 1.0]), torch.tensor([inf, 1.0])) == inf
    assert pyrys.relative_error(-big, big) == 2.0


def test_relative_error_is_relative_at_any_magnitude():
    """A helper's find: measured against at least 1e-12, outputs of 1e-14 erred 0.79 where the guard saw 6e-3."""
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for magnitude in (1e-14, 1e-30, 1e30):
        assert pyrys.relative_error(a * magnitude, b * magnitude) == pytest.approx(pyrys.relative_error(a, b))
    zeros = torch.zeros(3)
    assert pyrys.relative_error(zeros + 1e-13, zeros) == pytest.approx(0.1)  # zeros: against ZERO_SCALE


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), dtype=st.sampled_from(["float32", "float64", "bfloat16", "float16"]),
       magnitude=st.sampled_from([0.0, 1e-300, 1e-40, 1e-6, 1.0, 1e30, 1e300]),
       noise=st.sampled_from([0.0, 1e-7, 1e-3, 1.0]), shape=st.sampled_from([(1,), (7,), (3, 5, 2)]))
def test_relative_error_of_finite_tensors_is_the_general_measure(seed, dtype, magnitude, noise, shape):
    """Finite tensors take a shorter path (4 passes over them, not 15: the int8 guard measures every op's result);
    it gives the general case's number (up to that one's rounding: it divides before it subtracts, 1e-16 of
    the scale), and leaves the tensors as they were (a float64 one is not copied by ``.double()``)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    want = (torch.randn(shape, generator=generator, dtype=torch.float64) * magnitude).to(dtype)
    got = (want.double() + torch.randn(shape, generator=generator, dtype=torch.float64) * noise * magnitude).to(dtype)
    before = got.clone(), want.clone()
    fast = numerics._finite_error(got, want)
    with mock.patch.object(numerics, "_finite_error", lambda *_: None):
        general = pyrys.relative_error(got, want)
    if fast is not None:
        assert fast == pytest.approx(general, rel=1e-6, abs=1e-15)
    assert pyrys.relative_error(got, want) == pytest.approx(general, rel=1e-6, abs=1e-15)
    assert torch.equal(got, before[0]) and torch.equal(want, before[1])


def test_relative_error_compares_every_leaf_by_its_place():
    """A helper's fuzz: numbers, strings and dicts of swapped keys all measured 0.0, complex tensors as integers."""
    a = torch.randn(3, 4)
    assert pyrys.relative_error(1.1, 1.0) == pytest.approx(0.1) and pyrys.relative_error((a, 3), (a, 4)) == 1.0
    assert pyrys.relative_error({"x": a, "y": a * 5}, {"y": a * 5, "x": a}) == 0.0  # paired by key, not order
    assert pyrys.relative_error({"x": a, "y": a}, {"y": a * 5, "x": a}) == pytest.approx(0.8, rel=1e-6)
    for got, want, why in [(a, 1.0, "output type differs: Tensor vs eager's float"), ("a", "b", "value differs"),
                           ({"x": a}, {"y": a}, r"eager's \['y'\] missing; \['x'\] not in eager's")]:
        with pytest.raises(AssertionError, match=why):
            pyrys.relative_error(got, want)
    z = torch.randn(3, dtype=torch.complex64)
    assert 0 < pyrys.relative_error(z * (1 + 1e-6), z) < 1e-5


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.first(x)
        if self.training:
            y = y * 2
        else:
            y = torch.relu(y) + 1
        return torch.relu(self.second(y))


def test_an_inlined_torchscript_branch_keeps_its_twins(backend):
    """The If's output (``%y_1``, read by ``prim::TupleIndex``) is computed by the branch's ``add`` once the If is
    inlined: they are compared.  The branch's inner ``relu`` has no value in the captured graph (it lives in the
    If's block), so the linear it fused into is listed as made by pyrys."""
    opt = pyrys.optimize(torch.jit.script(Branches().eval()), (torch.randn(2, 4),), backend=backend, numerics=True)
    assert opt.numerics.first_over() is None, opt.numerics.render()
    assert opt.numerics.layer("y_1").op == "aten::add" and len(opt.numerics.unmatched) == 1


def test_the_tolerance_prints_as_it_is():
    """A helper's fuzz: ``tolerance=0.0046`` printed as 5e-03, with rows of 4.9e-03 marked over it."""
    from pyrys.numerics.report import format_tolerance

    assert [format_tolerance(t) for t in (1e-4, 0.0046, 1.5e-4, 5e-2)] == ["1e-04", "4.6e-03", "1.5e-04", "5e-02"]
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    explained = pyrys.explain(model, (torch.randn(4, 16),), numerics=True, tolerance=0.0046)
    assert "(tolerance 4.6e-03)" in explained.render()


def test_bisect_says_when_the_model_itself_is_random():
    """A helper's fuzz: dropout in training mode was blamed on the capture ("the capture changed the arithmetic")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4))  # training mode: random
    text = pyrys.bisect(model, (torch.randn(2, 8),)).render()
    assert "the model itself is random" in text and "capture changed the arithmetic" not in text
    assert "! the model gives other outputs on a second run" in text
