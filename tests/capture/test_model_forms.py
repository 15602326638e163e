"""Every model form captures on every way in: torch.export, TorchScript import, torch.compile.

The forms are the ones real callers bring: a top-level ``nn.Sequential`` (its BatchNorm's
``training`` flag lives at path ``"1"``), torchvision's ``Conv2dNormActivation``, ModuleLists and
nested Sequentials (numeric paths), submodules named like Python keywords (``class``,
``lambda``) or builtins (``input``), with dashes or dots.  On each way in BatchNorm folds
(the rule fires once) and the outputs agree with eager.
"""
from __future__ import annotations

import keyword
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import pyrys
from pyrys.ir.graph import identifier
from pyrys.testing import randomize_batchnorm
from tests.conftest import TOLERANCE, spy_dynamo_graphs

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")


class Stages(nn.Module):
    """Numeric paths two deep: ``stages.0.1`` is a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())])

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


class OddNames(nn.Module):
    """Submodules Python code cannot reach as ``self.<name>`` (``class``, ``bn_name``) or that shadow a builtin."""

    def __init__(self, bn_name: str):
        super().__init__()
        setattr(self, "class", nn.Conv2d(3, 8, 3))
        setattr(self, bn_name, nn.BatchNorm2d(8))
        setattr(self, "input", nn.ReLU())


class DashedNames(OddNames):
    def __init__(self):
        super().__init__("my-bn")

    def forward(self, x):  # literal names, so that TorchScript can script it
        return getattr(self, "input")(getattr(self, "my-bn")(getattr(self, "class")(x)))


class DottedNames(OddNames):
    """``bn.v2`` is one submodule (set with setattr; ``add_module`` refuses dots)."""

    def __init__(self):
        super().__init__("bn.v2")

    def forward(self, x):
        return getattr(self, "input")(getattr(self, "bn.v2")(getattr(self, "class")(x)))


FORMS = {  # each a conv, a BatchNorm and a ReLU
    "sequential": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
    "conv_norm_activation": lambda: torchvision.ops.Conv2dNormActivation(3, 8),
    "nested_sequential": lambda: nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)),
                                               nn.Sequential(nn.ReLU())),
    "module_list": Stages,
    "keyword_names": lambda: nn.Sequential(OrderedDict(
        [("lambda", nn.Conv2d(3, 8, 3)), ("class", nn.BatchNorm2d(8)), ("input", nn.ReLU())])),
    "dashed_names": DashedNames,
    "dotted_names": DottedNames,
}
DYNAMO_REFUSES_DOTS = pytest.mark.xfail(
    strict=True, reason="dynamo itself rejects a submodule name with a dot (AttrSource member must not contain '.')")


def make(form: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(FORMS[form]()).eval()


def image() -> torch.Tensor:
    return torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def fired(history, pass_name: str) -> dict:
    return next(step.fired for step in reversed(history) if step.name == pass_name)


def via_export(model, x):
    opt = pyrys.optimize(model, (x,), backend="reference")
    return opt(x), opt


def via_torchscript(model, x):
    opt = pyrys.optimize(torch.jit.script(model), (x,), backend="reference")
    return opt(x), opt


def via_compile(model, x, monkeypatch):
    made = spy_dynamo_graphs(monkeypatch)
    torch._dynamo.reset()
    try:
        y = torch.compile(model, backend="pyrys", options={"backend": "reference"})(x)
    finally:
        torch._dynamo.reset()
    (graph,) = made
    (opt,) = graph.programs.values()
    return y, opt


def check_folded_and_equal(model, x, y, opt):
    assert fired(opt.history, "fold_conv_bn") == {"conv_bn": 1}
    assert "batch_norm" not in opt.graph
    with torch.no_grad():
        assert pyrys.relative_error(y, model(x)) <= TOLERANCE


@pytest.mark.parametrize("form", FORMS)
def test_export(form):
    model = make(form)
    y, opt = via_export(model, image())
    check_folded_and_equal(model, image(), y, opt)


@pytest.mark.parametrize("form", FORMS)
def test_torchscript(form):
    model = make(form)
    y, opt = via_torchscript(model, image())
    check_folded_and_equal(model, image(), y, opt)


@pytest.mark.parametrize("form", [f if f != "dotted_names" else pytest.param(f, marks=DYNAMO_REFUSES_DOTS)
                                  for f in FORMS])
def test_torch_compile(form, monkeypatch):
    model = make(form)
    y, opt = via_compile(model, image(), monkeypatch)
    check_folded_and_equal(model, image(), y, opt)


@pytest.mark.parametrize("way", ["export", "torchscript"])
@pytest.mark.parametrize("form", ["sequential", "module_list", "keyword_names", "dotted_names"])
def test_unfrozen_state_reads_are_identifiers(form, way):
    """Nothing frozen: every state read stays an input, and FX writes each target as a parameter name."""
    model = make(form)
    source = model if way == "export" else torch.jit.script(model)
    opt = pyrys.optimize(source, (image(),), backend="reference", disable=["freeze_params", "freeze_flags"])
    targets = [n.target for n in opt.graph_module.graph.nodes if n.op == "placeholder"]
    assert any("training" in t for t in targets)  # the BatchNorm's flag, e.g. _1_training
    for target in targets:
        assert target.isidentifier() and not keyword.iskeyword(target), target
    assert len(set(targets)) == len(targets)
    with torch.no_grad():
        assert pyrys.relative_error(opt(image()), model(image())) <= TOLERANCE


def test_users_model_keeps_its_names():
    model = make("dotted_names")
    names = list(model.state_dict())
    pyrys.optimize(model, (image(),), backend="reference")
    assert list(model.state_dict()) == names and "bn.v2" in model._modules and "class" in model._modules


def test_renamed_submodules_are_noted():
    opt = pyrys.optimize(make("keyword_names"), (image(),), backend="reference")
    assert "submodule 'class' of Sequential is called 'class_' in the graph" in opt.report()


@pytest.mark.parametrize("hint, name", [
    ("1.training", "_1_training"), ("stages.0.1.training", "stages_0_1_training"), ("my-bn.weight", "my_bn_weight"),
    ("class", "class_"), ("lambda", "lambda_"), ("input", "input_"), ("torch", "torch_"), ("self", "self_"),
    ("", "_"), ("x", "x_1"), ("conv", "conv"),
])
def test_identifier(hint, name):
    assert identifier(hint, taken={"x"}) == name
    assert name.isidentifier() and not keyword.iskeyword(name)


class _WritesItsInput(nn.Module):
    def forward(self, a):
        a.add_(1)
        return a * 2


class _CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, a):
        self.calls += 1
        return a * self.calls


@pytest.mark.parametrize("way", ["export", "torchscript"])
def test_dropped_input_write_warns_and_outputs_match_eager(way):
    x = torch.rand(3, 4)
    model = _WritesItsInput() if way == "export" else torch.jit.script(_WritesItsInput())
    with pytest.warns(UserWarning, match="forward writes a in place"):
        opt = pyrys.optimize(model, (x.clone(),))
    given = x.clone()
    assert torch.allclose(opt(given), (x + 1) * 2)
    assert torch.equal(given, x)  # as the warning says: the caller's tensor is left as it was
    assert opt.writes == ("a",) and any(note.startswith("input writes dropped") for note in opt.notes)


def test_dropped_buffer_update_warns_and_is_noted(tmp_path):
    """Eager's second call reads ``calls == 1`` and gives ``2 a``; the optimized module gives ``a`` at every call:
    a note alone left that silent."""
    with pytest.warns(UserWarning, match="forward writes calls in place"):
        opt = pyrys.optimize(_CountsCalls().eval(), (torch.rand(3, 4),))
    assert opt.notes == ["state updates dropped (inference never writes them): calls"] and opt.writes == ("calls",)
    pyrys.save(opt, tmp_path / "saved")
    assert pyrys.load(tmp_path / "saved").writes == ("calls",)


class _TwoInputs(nn.Module):
    def forward(self, a, b, extra=None, pair=()):
        out = 2 * a - b
        for t in pair:
            out = out + t
        return out if extra is None else out * extra


@pytest.mark.parametrize("dynamic", [None, True])
def test_example_inputs_that_share_memory_give_a_graph_reading_each(dynamic):
    """torch.export captures ``(x, x)`` as one input; pyrys captures from copies, so other tensors later are each read."""
    x, y, z = torch.rand(3, 4), torch.rand(3, 4), torch.rand(3, 4)
    model = _TwoInputs()
    opt = pyrys.optimize(model, (x, x), {"extra": x[0], "pair": [x, x.view(4, 3).view(3, 4)]}, dynamic=dynamic)
    kwargs = {"extra": z[0], "pair": [y, z]}
    assert pyrys.relative_error(opt(x, y, **kwargs), model(x, y, **kwargs)) <= TOLERANCE
    assert pyrys.relative_error(opt(x, x, **kwargs), model(x, x, **kwargs)) <= TOLERANCE  # and aliased calls still work
