"""``pyrys.explain`` and ``pyrys explain MODEL``: per-pass counts and misses grouped by reason."""
import os
import sys

import pytest
import torch

import pyrys
from pyrys.cli import main
from pyrys import zoo
from pyrys.explain import reason_template
from pyrys.machine import native_bf16
from tests.models import conv_bn_relu, image


class TwoUsers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 4, 1)
        self.conv2 = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a, b = self.conv1(x), self.conv2(x)
        return torch.relu(a) + a, torch.relu(b) * b


def test_explain_counts_passes_and_groups_misses_by_reason():
    result = pyrys.explain(TwoUsers().eval(), (image(),))
    counts = {name: total for name, total, _ in result.pass_counts()}
    assert counts["fuse_post_ops"] == 0
    assert len(result.misses) == 4  # relu twice, add once, mul once
    groups = result.misses_by_reason()
    assert groups["conv_activation", "the output of %… has 2 users, so relu cannot run inside it"] == ["relu",
                                                                                                    "relu_1"]
    text = result.render()
    assert "misses: 4" in text and "2 x conv_activation: the output of %… has 2 users" in text


def test_explain_of_a_clean_model_has_no_misses():
    text = pyrys.explain(conv_bn_relu(), (image(),)).render()
    assert "fold_conv_bn: 1 folded (conv_bn: 1)" in text
    assert "fuse_post_ops: 1 fused (conv_activation: 1)" in text
    assert "misses: none" in text


def test_reason_template_drops_names_and_shapes():
    assert reason_template("the other operand of mul, %x_1 (1, 4, 5, 5), broadcasts %conv2d (1, 4, 1, 1)") == \
        "the other operand of mul, %… (…), broadcasts %… (…)"


def test_cli_explain_module_attr_with_dump_dir(tmp_path, capsys):
    assert main(["explain", "tests.models:conv_bn_relu", "--input-shape", "1x3x6x6",
                 "--dump-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fold_conv_bn: 1 folded" in out and "misses: none" in out
    assert (tmp_path / "000_capture.txt").exists()
    assert any(p.name.endswith("_fold_conv_bn.txt") for p in tmp_path.iterdir())
    assert main(["explain", "tests.models:conv_bn_relu", "--input-shape", "1x3x6x6", "--backend", "auto"]) == 0
    title = capsys.readouterr().out.splitlines()[0]  # said "on the auto backend"
    assert title.endswith(f"on the {pyrys.available_backends()[0]} backend"), title


def test_cli_explain_takes_an_accuracy_budget(capsys):
    """``--accuracy-budget``: the layers the guard keeps at it, each with why (the default budget rarely keeps any)."""
    shape = ["tests.models:conv_bn_relu", "--input-shape", "1x3x6x6", "--precision", "int8"]
    assert main(["explain", *shape, "--accuracy-budget", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "kept in " in out and "by the accuracy guard" in out and "accuracy_budget=1e-06" in out, out
    assert main(["explain", *shape, "--accuracy-budget", "none"]) == 0
    assert "by the accuracy guard" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="accuracy_budget= is read with precision='int8' or 'bf16' only"):
        main(["explain", "tests.models:conv_bn_relu", "--input-shape", "1x3x6x6", "--accuracy-budget", "1e-2"])


def test_explain_resnet50_has_no_misses_for_conv_bn_relu_and_residuals():
    from pyrys.testing import torchvision_model

    result = pyrys.explain(torchvision_model("resnet50"), (torch.rand(1, 3, 64, 64),))
    counts = {name: fired for name, _, fired in result.pass_counts()}
    assert counts["fold_conv_bn"] == {"conv_bn": 53}
    assert counts["fuse_post_ops"] == {"conv_activation": 49, "binary_add": 16}
    assert result.misses == []


def test_explain_takes_an_exported_programs_own_inputs_and_the_precisions_tolerance():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    x = torch.rand(2, 4)
    explained = pyrys.explain(torch.export.export(model, (x,)), numerics=True)
    assert explained.numerics.tolerance == pyrys.FP32_TOLERANCE
    bf16_tolerance = 3e-2 if native_bf16() else pyrys.FP32_TOLERANCE  # without native bf16 it runs fp32
    assert pyrys.explain(model, (x,), numerics=True, precision="bf16").numerics.tolerance == bf16_tolerance


@pytest.mark.parametrize("arguments, says", [
    (["--tolerance", "-1"], "argument --tolerance: expected a number >= 0 like 1e-4, got '-1'"),
    (["--accuracy-budget", "0"], "argument --accuracy-budget: expected a number > 0 like 1e-2, 'auto' or 'none', got '0'"),
    (["--disable", "nosuchpass"], "argument --disable: unknown pass 'nosuchpass'; the passes are freeze_params"),
    (["--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
    (["--input-shape", "1x-3x8x8"], "expected a shape like 1x3x224x224 (sizes 0 or more), got '1x-3x8x8'"),  # was torch's
])
def test_cli_explain_refuses_bad_flags_with_a_message(arguments, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["explain", "torch.nn:Identity", *arguments])
    assert stopped.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("spec, says", [("no_such_module_here:Net", "cannot import 'no_such_module_here'"),
                                        ("torch.nn:NoSuchNet", "'torch.nn' has no attribute 'NoSuchNet'"),
                                        ("no_such_zoo_model", "unknown model 'no_such_zoo_model': expected a torchvision"),
                                        ("torch.nn:Linear", "cannot be built with no arguments"),
                                        ("torch:float32", "is a dtype: neither an nn.Module nor something that"),
                                        (":Net", "cannot import '' .*give module:attribute"),
                                        ("no/such%s:Net%d", "cannot import 'no/such%s' .*not a module name"),
                                        ("./net.py:Net", "cannot import './net.py' .*give module:attribute")])
def test_cli_explain_says_which_model_it_cannot_find(spec, says):
    """Tracebacks before: torchvision's ValueError, Linear's TypeError; a dtype "cannot be built with no arguments"."""
    with pytest.raises(SystemExit, match=says):
        main(["explain", spec])


def _factory_with_a_bug() -> torch.nn.Module:
    return torch.nn.Linear("four", 3)


def test_cli_explain_finds_a_module_in_the_working_folder(tmp_path, monkeypatch, capsys):
    """A helper's find: the console script (unlike ``python -m``) has no working folder on ``sys.path``."""
    (tmp_path / "my_models_here.py").write_text("import torch\nnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    assert main(["explain", "my_models_here:net", "--input-shape", "1x3x8x8"]) == 0
    assert "misses: none" in capsys.readouterr().out


def test_cli_explain_says_it_explains_a_training_model_in_eval_mode(tmp_path, monkeypatch, capsys):
    """A helper's find: a factory's model in training mode was explained in eval mode, silently."""
    (tmp_path / "my_training_net.py").write_text("import torch\n"
                                                 "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
                                                 "torch.nn.BatchNorm2d(4)).train()\n")
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "my_training_net:net", "--input-shape", "1x3x8x8"]) == 0
    captured = capsys.readouterr()
    assert "is in training mode; explained in eval mode" in captured.err and "fold_conv_bn: 1 folded" in captured.out


def test_cli_explain_names_a_factorys_own_error_in_one_line():
    """A helper's fuzz: a TypeError inside a factory read "cannot be built with no arguments"; then a tester's: its
    traceback was printed whole.  Now the factory and its own error, in one line."""
    with pytest.raises(SystemExit, match=r"^pyrys explain: tests.test_explain:_factory_with_a_bug\(\) raised "
                                         r"TypeError: empty\(\)[^\n]*$"):
        main(["explain", "tests.test_explain:_factory_with_a_bug"])


@pytest.mark.parametrize("shape", ["99999999999x99999999999", "1x1x100000000x100000000"])  # overflows; 40 PB
def test_cli_explain_says_in_one_line_that_a_shape_is_too_large(shape):
    """A tester's find: torch's error from making the input, with its traceback."""
    with pytest.raises(SystemExit, match=rf"^pyrys explain: cannot make an input of shape {shape} here: [^\n]*$"):
        main(["explain", "torch.nn:Identity", "--input-shape", shape])


def test_cli_explain_shapes_a_models_own_inputs():
    """A model with ``example_inputs`` (token ids and a mask) was given an image of the shape: float ids."""
    from pyrys.bench.models import bert4

    ids, mask = zoo.example_inputs("pyrys.bench.models:bert4", bert4(), (2, 16))
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.long and bool((mask == 1).all())
    with pytest.raises(ValueError, match="--input-shape 1x3x8 does not fit .*bert4, whose inputs are 1x128, 1x128"):
        zoo.example_inputs("pyrys.bench.models:bert4", bert4(), (1, 3, 8))

    class OneTensor(torch.nn.Module):  # example_inputs giving one tensor: its rows were read as the inputs
        def forward(self, x, scale):
            return x * scale

        def example_inputs(self, batch):
            return torch.ones(batch, 16)

    (x,) = zoo.example_inputs("tests:OneTensor", OneTensor(), None)
    assert x.shape == (1, 16)
    with pytest.raises(ValueError, match="cannot make an input of shape 99999999999x99999999999 here"):
        zoo.example_inputs("tests:OneTensor", OneTensor(), (99999999999, 99999999999))
    OneTensor.example_inputs = lambda self, batch: (torch.ones(batch, 4), torch.tensor(2.0))
    with pytest.raises(ValueError, match="whose inputs are 1x4, a 0-d tensor: give one of their rank"):
        zoo.example_inputs("tests:OneTensor", OneTensor(), (2, 4))


class _OwnInputs(torch.nn.Module):
    """A model whose ``example_inputs`` gives what a test sets in ``given``."""
    given = None

    def forward(self, x):
        return x * 2

    def example_inputs(self, batch):
        if isinstance(self.given, Exception):
            raise self.given
        return self.given


@pytest.mark.parametrize("given, says", [
    ({"x": torch.ones(1, 4)}, r"example_inputs\(1\) should return a tensor or a tuple of .*, got dict"),
    ((), r"example_inputs\(1\) should return a tensor or a tuple of the model's positional inputs, got an empty"),
    (RuntimeError("no data here\nsecond line"), r"example_inputs\(1\) raised RuntimeError: no data here$"),
])
def test_cli_explain_says_in_one_line_what_a_models_example_inputs_should_give(given, says, monkeypatch):
    """A helper's find: a dict raised AttributeError ('str' object has no attribute 'shape'), and
    example_inputs' own error its traceback."""
    monkeypatch.setattr(_OwnInputs, "given", given)
    with pytest.raises(SystemExit, match=rf"^pyrys explain: tests.test_explain:_OwnInputs: {says}"):
        main(["explain", "tests.test_explain:_OwnInputs"])


def test_cli_explain_takes_a_number_among_a_models_own_inputs(monkeypatch, capsys):
    """A number among ``example_inputs`` raised AttributeError ('int' object has no attribute 'shape')."""
    class Scaled(_OwnInputs):
        def forward(self, x, scale):
            return x * scale

    monkeypatch.setattr(_OwnInputs, "given", (torch.ones(1, 4), 3))
    monkeypatch.setattr(sys.modules[__name__], "_Scaled", Scaled, raising=False)
    assert main(["explain", "tests.test_explain:_Scaled"]) == 0
    assert "tests.test_explain:_Scaled (1x4, 3) on the" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="inputs are 1x4, 3: give one of their rank \\(tensors' only\\)"):
        main(["explain", "tests.test_explain:_Scaled", "--input-shape", "2x4"])


@pytest.mark.parametrize("source, says", [
    ("raise RuntimeError('config file missing')", r"importing 'broken_here' \(from 'broken_here:net'\) raised "
                                                   r"RuntimeError: config file missing$"),
    ("import no_such_dependency_here", r"importing 'broken_here' .* failed: it imports 'no_such_dependency_here', "
                                       "which is not installed here$"),
    ("def (:", r"importing 'broken_here' .* raised SyntaxError"),
])
def test_cli_explain_says_in_one_line_why_a_module_failed_to_import(source, says, tmp_path, monkeypatch):
    """A review's find: a module raising anything but ImportError on import gave its traceback (and pyrys bench,
    checking its models first, the same); a missing dependency of the module read "cannot import" the module."""
    (tmp_path / "broken_here.py").write_text(source + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.delitem(sys.modules, "broken_here", raising=False)
    with pytest.raises(SystemExit, match=rf"^pyrys explain: {says}"):
        main(["explain", "broken_here:net"])


def test_cli_explain_refuses_a_tolerance_without_numerics():
    """A helper's find: ``--tolerance`` alone was read by nothing, silently (``pyrys.explain`` likewise)."""
    with pytest.raises(SystemExit, match="--tolerance is the error --numerics flags; give --numerics too"):
        main(["explain", "torch.nn:Identity", "--tolerance", "1e-3"])
    with pytest.raises(ValueError, match="tolerance= is the error numerics=True flags"):
        pyrys.explain(torch.nn.Identity(), (torch.ones(2),), tolerance=1e-3)
    with pytest.raises(TypeError, match="title must be a str"):  # was AttributeError: 'int' ... 'replace'
        pyrys.explain(torch.nn.Identity(), (torch.ones(2),), title=5)


def test_cli_explain_says_in_one_line_why_a_model_cannot_be_captured():
    with pytest.raises(SystemExit, match="pyrys explain: CaptureError: pyrys: torch.export cannot capture"):
        main(["explain", "tests.models:conv_bn_relu", "--input-shape", "1x3x1x1"])
