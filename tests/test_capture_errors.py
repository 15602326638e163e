"""Models pyrys cannot take say so: a ``pyrys:`` message naming what was expected and what to do.

Data-dependent control flow (``pyrys.CaptureError``), weights on ``meta`` (``pyrys.DeviceError``),
example inputs off the CPU (``pyrys.InputError``), a model ``copy.deepcopy`` cannot copy
(``pyrys.ModelCopyError``); each keeps torch's error as its cause where there is one.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import warnings

import pytest
import torch
from torch import nn

import pyrys
from tests.conftest import TOLERANCE
from tests.models import Fn, conv_bn_relu, image

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")


class BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y.relu()
        return y


class LoopOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        for _ in range(int(x.sum())):
            x = self.conv(x)
        return x


class Holding(nn.Module):
    """A conv + BatchNorm holding something ``copy.deepcopy`` refuses."""

    def __init__(self, thing):
        super().__init__()
        self.block = conv_bn_relu()
        self.thing = thing

    def forward(self, x):
        return self.block(x)


def test_branch_on_tensor_data_names_the_line_and_torch_compile():
    with pytest.raises(pyrys.CaptureError) as raised:
        pyrys.optimize(BranchOnData().eval(), (image(),), backend="reference")
    message = str(raised.value)
    assert message.startswith("pyrys: BranchOnData.forward branches on tensor data")
    assert "if y.sum() > 0:" in message and "test_capture_errors.py" in message
    assert 'torch.compile(model, backend="pyrys")' in message
    assert raised.value.__cause__ is not None  # torch's own error, chained


class CountOfSelected(nn.Module):
    """A branch on how many values a mask selects (torchvision's detection models: ``if boxes.numel() == 0``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x).flatten()
        y = y[y > 0]
        if y.numel() == 0:
            return x.sum()
        return y.sum()


@pytest.mark.parametrize("model", [BranchOnData, CountOfSelected])
def test_torch_s_partial_graph_is_not_printed_before_the_error(model, capfd):
    """torch.export printed the graph it had traced to stderr (1,700 lines for a detection model: a helper's
    find) before pyrys's error; it is kept on torch's error, the ``__cause__``."""
    stderr = sys.stderr
    with pytest.raises(pyrys.CaptureError, match="branches on tensor data") as raised:
        pyrys.optimize(model().eval(), (image(),), backend="reference")
    assert sys.stderr is stderr  # (no stream wrapped: a review's find left one wrapped, and wrapped None)
    printed = capfd.readouterr().err
    assert "def forward(" not in printed, printed[:400]
    print("stderr still writes", file=sys.stderr)
    assert capfd.readouterr().err == "stderr still writes\n"
    assert raised.value.__cause__ is not None


class PackedLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True)[0]


def test_sizes_made_from_a_tensor_s_values_are_said_so():
    """pack_padded_sequence makes sizes from its lengths: the error asked whether eager runs with gradients on
    (a helper's find); it says what the model does and what runs it."""
    with pytest.raises(pyrys.DataDependentError, match=r"PackedLengths's forward makes a size from a tensor's "
                                                       r"values .*Use torch.compile\(model, backend=\"pyrys\"\)"):
        pyrys.optimize(PackedLengths().eval(), (torch.randn(3, 5, 4), torch.tensor([5, 3, 2])), backend="reference")


def test_loop_count_from_tensor_data():
    with pytest.raises(pyrys.CaptureError, match=r"branches on tensor data.*range\(int\(x.sum\(\)\)\)"):
        pyrys.optimize(LoopOnData().eval(), (image(),), backend="reference")


class CountOnData(nn.Module):
    """A branch on the count of a mask's elements: torch's error names the line in another form."""

    def forward(self, x):
        y = x[x > 0.5]
        if y.numel() > 3:
            return y.sum()
        return x.sum()


def test_a_branch_on_a_count_of_data_names_the_line():
    """torch said where (``Caused by: (…ture_errors.py:N in forward)``, its path cut at the front), and the message
    named no line (a helper's find)."""
    with pytest.raises(pyrys.DataDependentError) as raised:
        pyrys.optimize(CountOnData().eval(), (torch.rand(4, 4),), backend="reference")
    assert f"at {__file__}:" in str(raised.value) and "(`if y.numel() > 3:`)" in str(raised.value)


def test_the_named_way_works():
    model = BranchOnData().eval()
    compiled = torch.compile(model, backend="pyrys", options={"backend": "reference"})
    try:
        for x in (image(), -image()):
            with torch.no_grad():
                assert pyrys.relative_error(compiled(x), model(x)) <= TOLERANCE
    finally:
        torch._dynamo.reset()


class MaskOnData(nn.Module):
    """A boolean mask: the output's shape depends on the values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y[y > 0].sum() + y.mean()


def test_a_shape_that_depends_on_data_names_the_line_and_torch_compile():
    model = MaskOnData().eval()
    with pytest.raises(pyrys.CaptureError) as raised:
        pyrys.optimize(model, (image(),), backend="reference")
    message = str(raised.value)
    assert message.startswith("pyrys: MaskOnData.forward makes a tensor whose shape depends on its data")
    assert "y[y > 0]" in message and 'torch.compile(model, backend="pyrys")' in message
    compiled = torch.compile(model, backend="pyrys", options={"backend": "reference"})
    try:
        with torch.no_grad():
            assert pyrys.relative_error(compiled(image()), model(image())) <= TOLERANCE
    finally:
        torch._dynamo.reset()


@torch.library.custom_op("pyrys_tests::add_one", mutates_args=("buf",))
def _add_one(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    buf.add_(1)
    return x + buf


@_add_one.register_fake
def _(x, buf):
    return torch.empty_like(x)


class TorchCond(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.linear(x).relu(), lambda x: x * 2 - 1, (x,))


def test_torch_cond_is_a_capture_error_and_runs_in_torch_under_torch_compile():
    """``torch.cond`` raised ``AttributeError: 'Module' object has no attribute 'true_graph_0'`` from torch.fx
    through every way in (a helper's find): it is a CaptureError saying what to do, and under
    ``torch.compile`` the graph holding it runs in torch."""
    model, x = TorchCond().eval(), torch.randn(2, 4)
    for way_in in (lambda: pyrys.optimize(model, (x,)), lambda: pyrys.optimize(torch.export.export(model, (x,)))):
        with pytest.raises(pyrys.CaptureError, match=r"uses torch.ops.higher_order.cond at cond .*a pyrys program "
                                                      r"runs one path. Write it as Python"):
            way_in()
    mutating = Fn(lambda m, x: _add_one(x, torch.zeros_like(x)) * 2).eval()  # auto_functionalized: not refused
    assert torch.equal(pyrys.optimize(mutating, (x,))(x), mutating(x))
    compiled = torch.compile(model, backend="pyrys")
    try:
        with torch.no_grad():
            for sign in (1, -1, 1):
                inputs = x.abs() * sign
                assert torch.allclose(compiled(inputs), model(inputs))
    finally:
        torch._dynamo.reset()


def test_torchscript_data_dependence_is_a_capture_error_too():
    scripted = torch.jit.script(LoopOnData().eval())
    with pytest.raises(pyrys.CaptureError, match="data-dependent control flow"):
        pyrys.optimize(scripted, (image(),), backend="reference")


def test_weights_on_meta():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(pyrys.DeviceError) as raised:
        pyrys.optimize(model, (image(),), backend="reference")
    message = str(raised.value)
    assert message.startswith("pyrys: 0.weight of Sequential is on the meta device")
    assert "CPU" in message and 'model.to_empty(device="cpu")' in message and "load_state_dict" in message


def test_materialized_as_the_message_says_then_optimizes():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model.to_empty(device="cpu")
    model.load_state_dict(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict())
    opt = pyrys.optimize(model, (image(),), backend="reference")
    assert pyrys.relative_error(opt(image()), model(image())) <= TOLERANCE


def test_torchscript_weights_on_meta():
    scripted = torch.jit.script(conv_bn_relu())
    scripted.to("meta")
    with pytest.raises(pyrys.DeviceError, match="conv.weight of ConvBnRelu is on the meta device"):
        pyrys.optimize(scripted, (image(),), backend="reference")


class Scaled(nn.Module):
    def forward(self, x, scale):
        return x * scale


def test_example_inputs_off_the_cpu():
    with pytest.raises(pyrys.InputError, match="example input 0 must be on the CPU.*on meta"):
        pyrys.optimize(conv_bn_relu(), (image().to("meta"),), backend="reference")
    with pytest.raises(pyrys.InputError, match="example input 1 must be on the CPU.*on meta"):
        pyrys.optimize(Scaled(), (image(),), {"scale": image().to("meta")}, backend="reference")


@pytest.mark.parametrize("thing, kind", [(threading.Lock(), "_thread.lock"), ("file", "_io.TextIOWrapper")])
def test_model_that_cannot_be_copied(thing, kind, tmp_path):
    if thing == "file":
        thing = open(tmp_path / "log.txt", "w")
    model = Holding(thing).eval()
    with pytest.raises(pyrys.ModelCopyError) as raised:
        pyrys.optimize(model, (image(),), backend="reference")
    message = str(raised.value)
    assert message.startswith("pyrys: copy.deepcopy cannot copy Holding")
    assert f"its attribute thing, a {kind}" in message
    assert "private copy" in message and "never modified" in message
    assert "__deepcopy__" in message and "torch.export.export(model, (x,))" in message
    assert isinstance(raised.value.__cause__, TypeError)
    assert isinstance(raised.value, TypeError)  # as copy.deepcopy's own error is


def test_exported_program_of_an_uncopyable_model_works():
    """The way the copy error names: an ExportedProgram is used without copying the model."""
    model = Holding(threading.Lock()).eval()
    opt = pyrys.optimize(torch.export.export(model, (image(),)), backend="reference")
    assert pyrys.relative_error(opt(image()), model(image())) <= TOLERANCE
    assert "fold_conv_bn: conv_bn: 1" in opt.report()


class Box:
    """A class torch's pytree does not know (as a HuggingFace cache is)."""

    def __init__(self, tensor):
        self.tensor = tensor


class ReturnsABox(torch.nn.Module):
    def forward(self, x):
        return x * 2, Box(x + 1)


def test_an_output_of_a_class_torch_export_cannot_take_apart_is_a_capture_error_saying_what_to_do():
    with pytest.raises(pyrys.CaptureError, match=r"ReturnsABox.forward returns a .*Box, which torch.export cannot take "
                                           r"apart.*wrap the model"):
        pyrys.optimize(ReturnsABox(), (torch.rand(2, 3),))


class TakesABox(torch.nn.Module):
    def forward(self, x, box):
        return x + box.tensor


def test_an_input_of_a_class_torch_export_cannot_take_apart_is_a_capture_error_saying_what_to_do():
    with pytest.raises(pyrys.CaptureError, match=r"TakesABox.forward takes a .*Box, which torch.export cannot take "
                                                 r"apart.*wrap the model"):
        pyrys.optimize(TakesABox(), (torch.rand(2, 3), Box(torch.rand(2, 3))))


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x, mask):
        return self.encoder(x, src_key_padding_mask=mask)


def test_a_shape_torch_export_cannot_trace_is_a_capture_error_naming_the_shapes():
    """A batch of 0 through torch's unfused attention path (the one torch.export traces) reshapes 0 elements
    to -1: torch's RuntimeError, chained under a pyrys message naming the model and the shapes."""
    opt = pyrys.optimize(PaddedEncoder().eval(), (torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)))
    with pytest.raises(pyrys.CaptureError, match=r"cannot capture PaddedEncoder on inputs of shapes \(\(0, 5, 16\), "
                                                 r"\(0, 5\)\): RuntimeError") as error:
        opt(torch.randn(0, 5, 16), torch.zeros(0, 5, dtype=torch.bool))
    assert isinstance(error.value.__cause__, RuntimeError)


class DrawsFromItsGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        return x + torch.rand(x.shape, generator=self.generator)


def test_a_generator_in_forward_is_a_capture_error_saying_what_to_do():
    """It was a bare AssertionError from the data-dependence check (a script object has no symbols)."""
    with pytest.raises(pyrys.CaptureError, match=r"uses torch._C.Generator .*torch.compile\(model, backend=.pyrys.\)"):
        pyrys.optimize(DrawsFromItsGenerator().eval(), (torch.ones(2, 3),))


def test_a_model_quantized_by_torch_ao_is_a_capture_error_saying_what_to_do():
    """Its packed parameters are TorchScript class objects: the message advised checking eager with gradients on."""
    torchvision = pytest.importorskip("torchvision")
    quantized = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=True).eval()
    with pytest.raises(pyrys.CaptureError, match="quantized packed parameters: a model quantized already"):
        pyrys.optimize(quantized, (torch.rand(1, 3, 64, 64),))


class ScalesByADraw(nn.Module):
    def forward(self, x):
        return x * torch.rand(1).item()


def test_a_value_read_into_python_is_named_so():
    """``.item()`` was refused as "a tensor whose shape depends on its data"."""
    with pytest.raises(pyrys.CaptureError, match=r"reads a tensor's value into a Python number at item"):
        pyrys.optimize(ScalesByADraw().eval(), (torch.ones(2, 3),))


@pytest.mark.parametrize("dynamic", [True, None])
def test_inputs_the_model_refused_are_refused_again_without_a_capture(dynamic, monkeypatch):
    """A new shape the model itself cannot take (3 channels expected, 5 given) is a ``CaptureError`` at every
    call; before, each call captured again (a symbolic export under ``dynamic=True``: about 28 KB of torch's
    shape environments kept for good each time, a stress helper found), now the first one's error is given."""
    import pyrys.optimized_module as optimized_module

    model, x = conv_bn_relu(), image(2)
    opt = pyrys.optimize(model, (x,), dynamic=dynamic)
    opt(image(3))  # a good new shape first (under dynamic=None, the capture for every shape)
    captures = []
    compile_signature = optimized_module.compile_signature
    monkeypatch.setattr(optimized_module, "compile_signature",
                        lambda *a, **k: captures.append(1) or compile_signature(*a, **k))
    bad = torch.randn(2, 5, *x.shape[2:])
    messages = []
    for _ in range(3):
        with pytest.raises(pyrys.CaptureError) as raised:
            opt(bad)
        messages.append(str(raised.value))
    assert len(captures) <= 1 and len(set(messages)) == 1 and "5" in messages[0]
    assert pyrys.relative_error(opt(image(4)), model(image(4))) <= TOLERANCE


def test_a_refusal_the_model_s_own_state_caused_passes_later():
    """A forward that raises while a flag is set: refused calls are answered from memory, but captured again at
    the 16th, 32nd ... call since, so that clearing the flag is seen (a reviewer's finding: refused for ever)."""

    class Flagged(nn.Module):
        failing = True

        def __init__(self):
            super().__init__()
            self.conv = conv_bn_relu()

        def forward(self, x):
            if self.failing and x.shape[0] == 3:
                raise RuntimeError("not now")
            return self.conv(x)

    model = Flagged().eval()
    opt = pyrys.optimize(model, (image(2),), dynamic=False)
    with pytest.raises(pyrys.CaptureError) as first:
        opt(image(3))
    with pytest.raises(pyrys.CaptureError) as again:
        opt(image(3))
    assert str(again.value) == str(first.value) and isinstance(again.value.__cause__, RuntimeError)
    Flagged.failing = False
    results = []
    for _ in range(16):
        try:
            results.append(opt(image(3)))
        except pyrys.CaptureError:
            pass
    assert results and pyrys.relative_error(results[-1], model(image(3))) <= TOLERANCE


def test_a_refused_first_new_shape_leaves_the_graph_for_every_shape_to_the_next():
    """Under ``dynamic=None`` the first new shape captures the graph for every shape; when that shape was one the
    model refuses, every later shape was captured on its own, with a note saying no dim could stay symbolic."""
    model, x = conv_bn_relu(), image(2)
    opt = pyrys.optimize(model, (x,))
    with pytest.raises(pyrys.CaptureError):
        opt(torch.randn(2, 5, *x.shape[2:]))
    assert pyrys.relative_error(opt(image(3)), model(image(3))) <= TOLERANCE
    assert any("captured once more with symbolic sizes" in note for note in opt.notes), opt.notes


@dataclasses.dataclass
class _Pair:
    first: torch.Tensor
    second: torch.Tensor


class _ReturnsPair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        return _Pair(y, torch.relu(y))


def test_a_dataclass_output_says_how_to_register_it_and_then_works():
    """The message said pyrys captured dataclasses, then refused one (a helper's find): it takes them
    registered with torch.export.register_dataclass."""
    model, x = _ReturnsPair().eval(), torch.randn(2, 4)
    with pytest.raises(pyrys.CaptureError, match=r"returns a .*_Pair.* torch.export.register_dataclass for a dataclass"):
        pyrys.optimize(model, x)
    torch.export.register_dataclass(_Pair)
    out = pyrys.optimize(model, x)(x)
    assert isinstance(out, _Pair) and torch.allclose(out.second, torch.relu(model.linear(x)), atol=1e-6)


def test_a_cut_path_several_files_end_with_is_given_as_torch_gave_it(monkeypatch):
    """torch cuts the path's head; "model.py" also ends "xmodel.py", whose line was quoted (a review's find)."""
    import sys
    import types

    from pyrys.capture.export import _data_read_at

    for name in ("proj_model", "proj_xmodel"):
        module = types.ModuleType(name)
        module.__file__ = f"/somewhere/{name.removeprefix('proj_')}.py"
        monkeypatch.setitem(sys.modules, name, module)
    assert _data_read_at("Caused by: (model.py:3 in forward)") == ("model.py", 3, "")
    assert _data_read_at("Caused by: (ewhere/xmodel.py:3 in forward)")[0] == "/somewhere/xmodel.py"


def test_a_hook_that_reads_values_is_named_when_the_capture_fails():
    """torch.export runs the modules' forward hooks on tensors without values: a hook calling ``.numpy()``
    failed the capture with a message naming forward alone (a helper's find)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    model[0].register_forward_hook(lambda module, inputs, output: output.numpy())
    with pytest.raises(pyrys.CaptureError, match="The forward hooks of '0' run in the capture too"):
        pyrys.optimize(model, (torch.rand(2, 4),))


def test_a_pruned_weight_computed_with_grad_gets_the_pruning_remedy():
    """``torch.nn.utils.prune`` computes ``weight`` in a forward pre-hook; computed with grad on, deepcopy
    refuses it, and the advice was to give torch.Tensor a __deepcopy__ (a helper's find)."""
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(4, 4)).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    model(torch.rand(2, 4))  # (grad on: the weight is computed as a graph's non-leaf)
    with pytest.raises(pyrys.ModelCopyError, match=r"prune.remove\(module, 'weight'\)"):
        pyrys.optimize(model, (torch.rand(2, 4),))


def test_a_lazy_module_not_yet_called_is_a_clear_error():
    """Parameters a lazy module makes at its first call (a helper's find: torch's "uninitialized parameter"
    error from inside pyrys's model copy)."""
    model = torch.nn.Sequential(torch.nn.LazyLinear(5), torch.nn.ReLU()).eval()
    x = torch.randn(2, 7)
    with pytest.raises(pyrys.CaptureError, match=r"Sequential has parameters not made yet \(0.weight, 0.bias: a lazy "
                                                  r"module's.*Call the model once on an example input"):
        pyrys.optimize(model, (x,), backend="reference")
    assert torch.nn.parameter.is_lazy(model[0].weight)  # untouched
    model(x)
    torch.testing.assert_close(pyrys.optimize(model, (x,), backend="reference")(x), model(x))


def test_process_wide_module_hooks_are_warned_of():
    """torch runs them in the capture (torch.export once more than eager, for a pre-hook) and on the optimized
    module's calls too (a helper's find: a hook doubling every output doubled pyrys's once more, unsaid)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        with pytest.warns(UserWarning, match="process-wide module hooks are registered"):
            pyrys.optimize(model, (torch.randn(2, 4),), backend="reference")
    finally:
        handle.remove()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyrys.optimize(model, (torch.randn(2, 4),), backend="reference")
    assert not [w for w in caught if "process-wide" in str(w.message)]
