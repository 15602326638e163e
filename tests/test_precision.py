"""precision="bf16": the graph it makes, its accuracy, its oneDNN program, and every way it is reached.

Where the CPU has no native bfloat16 pyrys runs fp32 (tested with the CPU check forced off); the
bf16 graph itself is tested on every CPU with the check forced on (torch and oneDNN emulate
bfloat16 where the CPU lacks it: slow, but the same arithmetic).  Tests of the oneDNN program's
kernels need a CPU with native bf16 and say so when skipped.
"""
from __future__ import annotations

import importlib
import re
import tempfile

import pytest
import torch

import pyrys
from pyrys.bench.models import Encoder
from pyrys.machine import native_bf16
from pyrys.numerics import BF16_TOLERANCE, FP32_TOLERANCE
from pyrys.testing import torchvision_model
from tests.caller_helpers import images, run_together
from tests.conftest import spy_dynamo_graphs
from tests.models import Fn, conv_bn_relu, image

precision_notes = importlib.import_module("pyrys.precision_notes")
needs_native_bf16 = pytest.mark.skipif(not native_bf16(), reason="the CPU has no native bf16 (avx512_bf16, amx_bf16)")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Treat this CPU as one with native bf16, so the bf16 graph is built and run here too."""
    monkeypatch.setattr(precision_notes, "native_bf16", lambda: True)


GOLDEN = """graph(%x : Float(1, 3, 6, 6)):
  %x_bf16 : BFloat16(1, 3, 6, 6) = aten::to(%x, torch.bfloat16)
  %conv_weight_bn_folded_bf16_1 : BFloat16(4, 3, 3, 3) = prim::Constant[value=<Tensor>]()
  %conv_bias_bn_folded_bf16_1 : BFloat16(4) = prim::Constant[value=<Tensor>]()
  %conv2d_1 : BFloat16(1, 4, 4, 4) = pyrys::conv2d_relu(%x_bf16, %conv_weight_bn_folded_bf16_1, %conv_bias_bn_folded_bf16_1, [1, 1], [0, 0], [1, 1], 1)
  %conv2d_1_f32 : Float(1, 4, 4, 4) = aten::to(%conv2d_1, torch.float32)
  return (%conv2d_1_f32)"""


def test_golden_graph_and_counts(bf16_cpu, backend):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, precision="bf16")
    assert opt.graph == GOLDEN
    (step,) = [s for s in opt.history if s.name == "lower_precision"]
    assert step.fired == {"bf16": 1, "conversion": 4}  # the conv; input, weight, bias, output
    y = opt(image())
    assert y.dtype == torch.float32 and 1e-5 < pyrys.relative_error(y, conv_bn_relu()(image())) <= BF16_TOLERANCE


def test_fp32_is_the_default_and_untouched(backend):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend)
    (step,) = [s for s in opt.history if s.name == "lower_precision"]
    assert step.fired == {} and "BFloat16" not in opt.graph


def test_a_torchvision_model_in_bf16(bf16_cpu, backend):
    model, x = torchvision_model("resnet18"), torch.rand(2, 3, 64, 64)
    opt = pyrys.optimize(model, (x,), backend=backend, precision="bf16", numerics=True)
    error = pyrys.relative_error(opt(x), model(x))
    assert 1e-5 < error <= BF16_TOLERANCE  # bf16 really ran, and within its tolerance
    report = opt.numerics
    assert report.tolerance == BF16_TOLERANCE and report.first_over() is None, report.render()
    rows = dict(report.passes)
    assert rows["fuse_post_ops"] <= FP32_TOLERANCE < rows["lower_precision"]  # where the error comes from
    # each layer's error is against eager's value there, all the rounding before it included, as a max norm: deep
    # in the network it passes the output's (5.6e-2 where the output errs 2.4e-2; eager in bf16 errs 2.9e-2)
    assert report.layers and all(layer.error <= 3 * BF16_TOLERANCE for layer in report.layers), report.render()
    assert max(layer.error for layer in report.layers) > 1e-3  # (measured where bf16 ran)


def test_bisect_names_the_precision_pass(bf16_cpu):
    assert pyrys.bisect(conv_bn_relu(), (image(),), backend="reference", precision="bf16").stage is None  # 3e-2
    found = pyrys.bisect(conv_bn_relu(), (image(),), backend="reference", precision="bf16", tolerance=1e-4)
    assert found.stage == "lower_precision" and any("aten::to(%x, torch.bfloat16)" in line for line in found.changed)


def test_norms_and_softmax_stay_in_float32(bf16_cpu, backend):
    torch.manual_seed(0)
    model = Encoder(layers=2, width=64, heads=4, tokens=16).eval()
    inputs = model.example_inputs(2)
    opt = pyrys.optimize(model, inputs, backend=backend, precision="bf16")
    assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= BF16_TOLERANCE
    lines = opt.graph.splitlines()
    assert all(line.split(" = ")[0].endswith(")") and ": Float(" in line
               for line in lines if "aten::layer_norm" in line or "aten::_softmax" in line or "aten::softmax" in line)
    assert any(": BFloat16(" in line and "pyrys::linear" in line for line in lines)


def test_an_average_pooling_of_video_stays_in_float32(bf16_cpu, backend):
    """torch 2.14 has no bfloat16 avg_pool3d on CPU: S3D's optimize raised NotImplementedError from the check
    against torch (and a torch step would have)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3), torch.nn.AvgPool3d(2), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 4, 16, 16)
    opt = pyrys.optimize(model, (x,), backend=backend, precision="bf16")
    assert pyrys.relative_error(opt(x), model(x)) <= BF16_TOLERANCE
    assert any("avg_pool3d" in line and ": Float(" in line for line in opt.graph.splitlines())


def test_new_shapes_and_save_load(bf16_cpu, backend):
    model = conv_bn_relu()
    opt = pyrys.optimize(model, (image(),), backend=backend, precision="bf16")
    assert pyrys.relative_error(opt(image(batch=3)), model(image(batch=3))) <= BF16_TOLERANCE
    with tempfile.TemporaryDirectory() as directory:
        pyrys.save(opt, f"{directory}/m")
        loaded = pyrys.load(f"{directory}/m")
    assert torch.equal(loaded(image()), opt(image())) and "BFloat16" in loaded.graph


def test_without_native_bf16_it_runs_fp32_and_says_so(monkeypatch, backend):
    monkeypatch.setattr(precision_notes, "native_bf16", lambda: False)
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, precision="bf16")
    assert any("precision='bf16' runs in fp32: no native bfloat16 here" in note for note in opt.notes)
    assert "BFloat16" not in opt.graph
    assert pyrys.relative_error(opt(image()), conv_bn_relu()(image())) <= FP32_TOLERANCE


def test_a_bad_precision_is_refused():
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'int8'\), got 'int4'"):
        pyrys.optimize(conv_bn_relu(), (image(),), precision="int4")


def test_torch_compile_option(bf16_cpu, monkeypatch, backend):
    torch._dynamo.reset()
    graphs = spy_dynamo_graphs(monkeypatch)
    model = conv_bn_relu()
    y = torch.compile(model, backend="pyrys", options={"backend": backend, "precision": "bf16"})(image())
    (opt,) = graphs[0].programs.values()
    assert "BFloat16" in opt.graph and y.dtype == torch.float32
    assert pyrys.relative_error(y, model(image())) <= BF16_TOLERANCE


def test_many_callers_get_the_single_callers_answer(bf16_cpu, backend):
    model = conv_bn_relu()
    # the thread count pinned: equal bits are promised at one thread count (busy CPUs may change the default's)
    opt = pyrys.optimize(model, (image(),), backend=backend, precision="bf16", threads=torch.get_num_threads())
    inputs = images(8, seed=3, shape=(1, 3, 6, 6))
    expected = [opt(x) for x in inputs]

    def caller():
        return all(torch.equal(opt(x), want) for _ in range(10) for x, want in zip(inputs, expected))

    assert all(run_together([caller] * 4))


@needs_native_bf16
def test_the_dnnl_program_runs_the_convs_in_bf16():
    model = torchvision_model("resnet18")
    opt = pyrys.optimize(model, (torch.rand(1, 3, 64, 64),), backend="dnnl", precision="bf16", layout="nhwc")
    lines = opt.program_text().splitlines()
    convs = [line for line in lines if "dnnl::conv2d" in line]
    assert len(convs) == 20 and all(": BFloat16(" in line for line in convs)
    assert not [line for line in lines if "torch::" in line]
    converts = [line for line in lines if "dnnl::reorder" in line and ("_bf16 :" in line or "_f32 :" in line)]
    assert len(converts) == 1 and "acdb" in converts[0]  # the input into bf16, straight into the convs' layout
    (linear,) = [line for line in lines if "dnnl::linear" in line]
    assert "dst_dtype=f32" in linear  # the classifier writes float32 itself: no conversion step after it


@needs_native_bf16
def test_a_model_already_in_bf16_runs_in_onednn():
    model = torchvision_model("resnet18").to(torch.bfloat16)
    x = torch.rand(1, 3, 64, 64).to(torch.bfloat16)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    y = opt(x)
    assert y.dtype == torch.bfloat16 and pyrys.relative_error(y.float(), model(x).float()) <= BF16_TOLERANCE
    lines = opt.program_text().splitlines()
    assert sum("dnnl::conv2d" in line for line in lines) == 20 and not [line for line in lines if "torch::" in line]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_notes_name_the_dtype_a_model_of_another_dtype_runs_in(bf16_cpu, dtype):
    """They said "float32" (and an accuracy measured against it) for a model that runs in its own dtype."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval().to(dtype)
    x = torch.randn(2, 8).to(dtype)
    name = str(dtype).removeprefix("torch.")
    bf16 = pyrys.optimize(model, (x,), backend="reference", precision="bf16")
    said = [note for note in bf16.notes if note.startswith("precision='bf16'")]
    assert said == ([] if dtype == torch.bfloat16 else [  # a bfloat16 model runs in bf16 already
        f"precision='bf16': no op could run in bf16 here, so the model runs in {name} (an op pyrys runs through "
        "torch, such as torch's fused TransformerEncoderLayer fast path, keeps its dtype)"])
    int8 = pyrys.optimize(model, (x,), backend="reference", precision="int8", calibration=[x, x * 2])
    assert f"no convolution or linear could run in int8 here, so the model runs in {name} (see misses)" in int8.report()
    assert {miss.reason for miss in int8.misses} == {f"stays {name}: its weight is not a float32 constant"}


def test_explain_cli_precision(bf16_cpu, capsys):
    from pyrys.cli import main

    assert main(["explain", "tests.models:conv_bn_relu", "--input-shape", "1x3x6x6", "--precision", "bf16",
                 "--numerics"]) == 0
    out = capsys.readouterr().out
    assert "lower_precision: 5 changed (conversion: 4, bf16: 1)" in out and "(tolerance 3e-02)" in out


class Stream(torch.nn.Module):
    """A position embedding added to the input, a residual stream between layer norms, a 0-dim operand,
    and angles for sin/cos: values no bf16 op computed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.pos = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.randn(1, 8))

    def forward(self, x, t):
        h = x + self.pos
        for _ in range(3):
            h = h + self.fc(torch.layer_norm(h, (8,)))
        angles = t[:, None] * torch.arange(1, 9).float()[None] * 37.5
        rotary = torch.matmul(t[:, None], t[None, :] * 0 + 37.5)  # two activations (a constant would be a linear)
        return h + self.fc(x).mean(), torch.cat([angles.sin(), angles.cos(), rotary.sin()], -1)


def test_float32_values_no_bf16_op_computed_stay_float32(bf16_cpu, backend):
    model, x, t = Stream().eval(), torch.randn(4, 8), torch.tensor([1.0, 500.0, 999.0, 3.0])
    opt = pyrys.optimize(model, (x, t), backend=backend, precision="bf16", verify=True)
    outputs = opt(x, t)
    assert [y.dtype for y in outputs] == [torch.float32, torch.float32]
    assert pyrys.relative_error(outputs, model(x, t)) <= BF16_TOLERANCE  # the angles were not rounded
    lines = {line.split(" : ")[0].strip(): line for line in opt.graph.splitlines() if " : " in line}
    assert ": Float(" in lines["%add"] and ": Float(" in lines["%mul"] and ": Float(" in lines["%mul_1"]
    assert ": Float(" in lines["%matmul"]  # a product of two float32 values no bf16 op computed
    fused = [line for line in lines.values() if "pyrys::linear_add" in line]
    assert len(fused) == 3 and all(": Float(" in line and "_bf16" in line for line in fused)  # bf16 in, f32 sum


def test_unfrozen_weights_stay_float32(bf16_cpu, backend):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, precision="bf16", freeze_params=())
    assert "BFloat16" not in opt.graph  # converting them on every call would cost more than bf16 saves


class PatchEmbedding(torch.nn.Module):
    """ViT's embeddings: a conv's patches (bf16) plus a position embedding, then pre-norm layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patches, self.fc = torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Linear(8, 8)
        self.pos = torch.nn.Parameter(torch.randn(1, 4, 8))

    def forward(self, x):
        h = self.patches(x).flatten(2).transpose(1, 2) + self.pos
        for _ in range(2):
            h = h + self.fc(torch.layer_norm(h, (8,)))
        return torch.layer_norm(h, (8,))


def test_a_sum_a_norm_reads_stays_float32(bf16_cpu, backend):
    model, x = PatchEmbedding().eval(), torch.randn(1, 3, 8, 8)
    opt = pyrys.optimize(model, (x,), backend=backend, precision="bf16", verify=True)
    assert pyrys.relative_error(opt(x), model(x)) <= BF16_TOLERANCE
    lines = {line.split(" : ")[0].strip(): line for line in opt.graph.splitlines() if " : " in line}
    assert ": Float(" in lines["%add"] and ": BFloat16(" in lines["%conv2d"], opt.graph  # the conv in bf16, its sum not
    fused = [line for line in lines.values() if "pyrys::linear_add" in line]
    assert len(fused) == 2 and all(": Float(" in line for line in fused)  # the stream stays float32


GOLDEN_BF16_OUT = GOLDEN.replace("  %conv2d_1_f32 : Float(1, 4, 4, 4) = aten::to(%conv2d_1, torch.float32)\n", "") \
    .replace("return (%conv2d_1_f32)", "return (%conv2d_1)")


def test_output_dtype_bf16_returns_the_bf16_result_as_it_is(bf16_cpu, backend):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, precision="bf16", output_dtype=torch.bfloat16,
                         verify=True, numerics=True)
    assert opt.graph == GOLDEN_BF16_OUT
    (step,) = [s for s in opt.history if s.name == "lower_precision"]
    assert step.fired == {"bf16": 1, "conversion": 3}  # input, weight, bias: no conversion back
    y = opt(image())
    assert y.dtype == torch.bfloat16 and pyrys.relative_error(y.float(), conv_bn_relu()(image())) <= BF16_TOLERANCE
    assert opt.numerics.first_over() is None and opt.numerics.backend_error <= BF16_TOLERANCE, opt.numerics.render()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_output_dtype_converts_every_floating_output_and_nothing_else(bf16_cpu, backend, precision):
    class Two(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2.0, x.argmax(-1)

    x = image()
    for dtype in (torch.bfloat16, torch.float32, None):
        opt = pyrys.optimize(Two().eval(), (x,), backend=backend, precision=precision, output_dtype=dtype, verify=True)
        values, indices = opt(x)
        assert values.dtype == (dtype or torch.float32) and indices.dtype == torch.int64
        assert pyrys.relative_error(values.float(), Two()(x)[0]) <= BF16_TOLERANCE
        assert torch.equal(indices, x.argmax(-1))


def test_a_bad_output_dtype_is_refused():
    with pytest.raises(ValueError, match="output_dtype must be None, torch.float32 or torch.bfloat16, got torch.float16"):
        pyrys.optimize(conv_bn_relu(), (image(),), output_dtype=torch.float16)
    with pytest.raises(ValueError, match="output_dtype is not available through torch.compile"):
        from pyrys.compile_backend import pyrys_backend
        pyrys_backend(torch.fx.symbolic_trace(conv_bn_relu()), [image()], {"output_dtype": torch.bfloat16})


def test_numerics_of_bf16_outputs_from_fp32_counts_their_rounding_against_the_bf16_tolerance(backend):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, output_dtype=torch.bfloat16, numerics=True)
    report = opt.numerics
    assert report.tolerance == BF16_TOLERANCE and report.first_over() is None, report.render()
    assert FP32_TOLERANCE < report.backend_error <= BF16_TOLERANCE  # the rounding to bfloat16 is measured


class Cancelling(torch.nn.Module):
    """A linear taking differences of neighbouring features of an input that is ~100 everywhere: the
    differences are ~1e-2, and rounding the input to bfloat16 (steps of 0.5 there) loses them all; the
    linear after it is benign."""

    def __init__(self):
        super().__init__()
        self.differences, self.mix = torch.nn.Linear(8, 7, bias=False), torch.nn.Linear(7, 4)
        with torch.no_grad():
            self.differences.weight.copy_(torch.eye(7, 8) - torch.eye(8)[1:])

    def forward(self, x):
        return self.mix(self.differences(x) * 100)

    @staticmethod
    def inputs(batch: int = 4, seed: int = 0) -> torch.Tensor:
        return 100 + 0.01 * torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def test_accuracy_budget_keeps_the_op_that_breaks_it_in_float32(bf16_cpu, backend):
    model, x = Cancelling().eval(), Cancelling.inputs()
    unguarded = pyrys.optimize(model, (x,), backend=backend, precision="bf16", accuracy_budget=None)
    assert pyrys.relative_error(unguarded(x), model(x)) > 0.1  # the differences are lost in bf16
    assert unguarded.notes == []  # nothing measured
    opt = pyrys.optimize(model, (x,), backend=backend, precision="bf16", accuracy_budget=1e-2, verify=True)
    (miss,) = opt.misses
    assert miss.rule == "bf16" and "kept in float32 by the accuracy guard" in miss.reason
    assert "accuracy_budget=0.01" in miss.reason and "on the inputs compiled for" in miss.reason
    assert re.search(rf"%{miss.node} : Float\(4, 7\) = aten::linear\(%x, ", opt.graph)  # the differences, in float32
    (step,) = [s for s in opt.history if s.name == "lower_precision"]
    assert step.fired["bf16"] >= 1 and "BFloat16(4, 4) = aten::linear" in opt.graph  # the mix stays bf16
    error = pyrys.relative_error(opt(x), model(x))
    assert error <= 1e-2
    (note,) = [n for n in opt.notes if "outputs within" in n]
    assert "accuracy_budget=0.01: 1 op kept in float32, see misses" in note
    assert float(re.search(r"within (\S+) of float32", note).group(1)) == pytest.approx(error, rel=0.1, abs=1e-3)
    other = Cancelling.inputs(batch=6, seed=1)  # a new shape: its own capture, guarded on its own inputs
    assert pyrys.relative_error(opt(other), model(other)) <= 1e-2


class LoudAndQuiet(torch.nn.Module):
    """Two difference-taking linears (:class:`Cancelling`'s): ``quiet`` on features ~100 (bf16 loses every
    difference: its own error ~1), its result scaled down 1e3 before it joins the output; ``loud`` on features
    ~10 (bf16 moves its result by ~3e-2); their results side by side are the output (so no sum fuses them)."""

    def __init__(self):
        super().__init__()
        self.quiet, self.loud = Cancelling().differences, Cancelling().differences

    def forward(self, x):
        return torch.cat([self.loud(x[:, 8:]), 1e-3 * self.quiet(x[:, :8])], dim=1)

    @staticmethod
    def inputs(batch: int = 4, seed: int = 0) -> torch.Tensor:
        noise = torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed))
        return torch.cat([100 + 0.01 * noise[:, :8], 10 + 0.5 * noise[:, 8:]], dim=1)


def test_the_guard_keeps_the_op_that_moves_the_outputs_not_the_one_that_moves_its_own(bf16_cpu):
    """The guard orders ops by their effect on the outputs (:mod:`pyrys.numerics.sensitivity`): ``loud`` alone is
    kept; by own error ``quiet`` came first, and both were kept."""
    model, x = LoudAndQuiet().eval(), LoudAndQuiet.inputs()
    unguarded = pyrys.optimize(model, (x,), precision="bf16", accuracy_budget=None, backend="reference")
    assert pyrys.relative_error(unguarded(x), model(x)) > 1e-2
    opt = pyrys.optimize(model, (x,), precision="bf16", accuracy_budget=1e-2, backend="reference")
    (miss,) = opt.misses
    assert re.search(rf"%{miss.node} : Float\(4, 7\) = aten::linear\(%slice_\d+, %loud_weight", opt.graph), opt.graph
    own, effect = map(float, re.search(r"moves its own result by (\S+) and, to first order, the outputs by about (\S+) ", miss.reason).groups())
    assert 1e-3 < own < 0.1 and effect > 1e-2, miss.reason
    assert "the op that moves the outputs the most" in miss.reason
    assert pyrys.relative_error(opt(x), model(x)) <= 1e-2


def test_the_program_is_held_to_the_error_with_the_kept_ops(bf16_cpu, monkeypatch):
    """Where the guard keeps ops, the compiled program is measured against the error the guard found with them
    kept (a reused name once left the error with none kept there: the program's own error went unreported)."""
    compiled_module = importlib.import_module("pyrys.compiled")
    measures, program_error = [], compiled_module.program_error
    monkeypatch.setattr(compiled_module, "program_error",
                        lambda measure, *args: measures.append(measure) or program_error(measure, *args))
    model, x = LoudAndQuiet().eval(), LoudAndQuiet.inputs()
    opt = pyrys.optimize(model, (x,), precision="bf16", accuracy_budget=1e-2, backend="dnnl")
    (measure,) = measures
    assert len(opt.misses) == 1 and measure.error <= measure.budget == 1e-2
    (note,) = [n for n in opt.notes if "outputs within" in n]
    assert float(re.search(r"within (\S+) of float32", note).group(1)) == pytest.approx(
        pyrys.relative_error(opt(x), model(x)), rel=0.05)  # the program's error, not torch's ops'


def test_the_default_budget_measures_and_keeps_what_holds(bf16_cpu, backend):
    model, x = conv_bn_relu(), image()
    opt = pyrys.optimize(model, (x,), backend=backend, precision="bf16")
    assert opt.misses == [] and opt.graph == GOLDEN  # ~4e-3: within the default 3e-2
    (note,) = [n for n in opt.notes if "outputs within" in n]
    assert "accuracy_budget=0.03)" in note
    measured = float(re.search(r"within (\S+) of float32", note).group(1))
    assert 1e-5 < measured <= BF16_TOLERANCE


def test_calibration_samples_are_what_the_bf16_guard_measures_on(bf16_cpu, backend):
    model = Cancelling().eval()
    samples = [Cancelling.inputs(seed=seed) for seed in range(6)]
    opt = pyrys.optimize(model, (samples[0],), backend=backend, precision="bf16", calibration=samples,
                         accuracy_budget=1e-2)
    assert [m.rule for m in opt.misses] == ["bf16"] and "on 4 calibration samples" in opt.misses[0].reason
    for x in samples:
        assert pyrys.relative_error(opt(x), model(x)) <= 1e-2
    for batch in (2, 7):  # new shapes: the symbolic capture is guarded on the same samples, and says so
        x = Cancelling.inputs(batch=batch, seed=batch)
        assert pyrys.relative_error(opt(x), model(x)) <= 1e-2, batch
    assert any(n.startswith("the capture for inputs (Float(2, 8)): precision='bf16': outputs within") and
               "on 4 calibration samples" in n and "1 op kept" in n for n in opt.notes), opt.notes
    unmeasured = pyrys.optimize(model, (samples[0],), precision="bf16", calibration=samples, accuracy_budget=None)
    assert unmeasured.misses == [] and not any("outputs within" in n for n in unmeasured.notes)
    script = torch.jit.script(model)
    for name in ("weight", "bias"):
        pyrys._jit_pass_freeze_params(script._c, "forward", name)
    scripted = pyrys.jit.compile(script, samples[0], backend=backend, precision="bf16",
                                 calibration=samples, accuracy_budget=1e-2)  # pyrys.jit takes them too
    assert any("outputs within" in n and "on 4 calibration samples" in n for n in scripted.notes), scripted.notes
    with pytest.raises(pyrys.InputError, match="calibration sample 1 must be inputs like the example inputs"):
        pyrys.optimize(model, (samples[0],), precision="bf16", calibration=[samples[0], torch.randn(3, 9)])
    with pytest.raises(ValueError, match="calibration= is read with precision='int8' or 'bf16' only, not 'fp32'"):
        pyrys.optimize(model, (samples[0],), calibration=samples)
    with pytest.raises(ValueError, match="accuracy_budget= is read with precision='int8' or 'bf16' only, not 'fp32'"):
        pyrys.optimize(model, (samples[0],), accuracy_budget=1e-2)


def test_a_guard_that_cannot_measure_says_so_and_compiles(bf16_cpu, monkeypatch):
    from pyrys.passes.precision_guard import Bf16Guard

    def fails(self, gm, lower, rounding):
        raise RuntimeError("no reference run here")

    monkeypatch.setattr(Bf16Guard, "choose", fails)
    model, x = Cancelling().eval(), Cancelling.inputs()
    opt = pyrys.optimize(model, (x,), precision="bf16", accuracy_budget=1e-2)
    assert any("accuracy guard could not measure the graph" in n and "no reference run here" in n for n in opt.notes)
    assert opt.misses == [] and "BFloat16(4, 7) = aten::linear" in opt.graph  # compiled as without a guard


@pytest.mark.parametrize("example", ["nan", "inf", "zeros"])
def test_the_guard_says_it_cannot_measure_on_outputs_without_a_number(bf16_cpu, example):
    """All-NaN, all-inf or all-zero outputs make every error 0: the guard read "within 0.0e+00" and kept
    nothing (the program erred 0.23 on other data; a helper's find)."""
    model = Fn(lambda m, x: m.differences(x) * 100, differences=Cancelling().differences).eval()
    x = {"nan": torch.full((4, 8), float("nan")), "inf": torch.full((4, 8), float("inf")),
         "zeros": torch.zeros(4, 8)}[example]
    opt = pyrys.optimize(model, (x,), precision="bf16", accuracy_budget=1e-2)
    assert any("accuracy guard could not measure the graph" in n and "all 0 or not finite" in n for n in opt.notes)
    assert not any("outputs within" in n for n in opt.notes), opt.notes
    wide = pyrys.optimize(model.double(), (x.double(),), precision="bf16", accuracy_budget=1e-2)
    assert not any("accuracy guard" in n for n in wide.notes), wide.notes  # (nothing lowered: nothing measured)


def test_disabling_lower_precision_says_what_it_leaves_undone(bf16_cpu, backend):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, precision="bf16", output_dtype=torch.bfloat16,
                         disable=("lower_precision",))
    assert opt(image()).dtype == torch.float32 and "BFloat16" not in opt.graph
    assert "the pass lower_precision is disabled: precision='bf16' and output_dtype=torch.bfloat16 not applied" in opt.notes


def test_a_graph_with_no_op_in_bf16_says_so_also_through_torch_compile(bf16_cpu, caplog):
    """torch.compile hands over torch's fused TransformerEncoderLayer fast path, one op pyrys runs through torch."""
    model, x = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval(), torch.rand(2, 5, 16)
    compiled = torch.compile(model, backend="pyrys", options={"precision": "bf16", "backend": "reference"})
    with torch.no_grad(), caplog.at_level("INFO", logger="pyrys"):
        assert pyrys.relative_error(compiled(x), model(x)) <= 1e-5
    assert "precision='bf16': no op could run in bf16 here" in caplog.text


class StepWithCancelling(torch.nn.Module):
    """A decoder step (``x`` of ``(batch, tokens, 16)``, a KV cache) beside differences bf16 loses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.diff = torch.nn.Linear(16, 15, bias=False)
        with torch.no_grad():
            self.diff.weight.copy_(torch.eye(15, 16) - torch.eye(16)[1:])

    def forward(self, x, past_k, past_v):
        batch, tokens, _ = x.shape
        q, k, v = (layer(x).view(batch, tokens, 2, 8).transpose(1, 2) for layer in (self.q, self.k, self.v))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        attended = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return attended.transpose(1, 2).reshape(batch, tokens, 16), self.diff(0.01 * x + 100)

    @staticmethod
    def inputs(batch: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        draw = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(shape, generator=draw) for shape in
                     [(batch, tokens, 16), (batch, 2, 5, 8), (batch, 2, 5, 8)])


def test_a_capture_the_calibration_samples_do_not_fit_is_guarded_on_its_own_inputs(bf16_cpu, backend):
    """A capture for one token (its size-1 dim fixed) takes no sample of three tokens: its guard measured
    nothing and ran every op in bf16 (the differences off by 1.0); it measures on the inputs it compiles for."""
    model = StepWithCancelling().eval()
    opt = pyrys.optimize(model, StepWithCancelling.inputs(2, 3), backend=backend, precision="bf16",
                         calibration=[StepWithCancelling.inputs(2, 3, seed) for seed in range(4)],
                         accuracy_budget=1e-2)
    for batch, tokens in [(3, 3), (3, 1), (2, 1)]:
        inputs = StepWithCancelling.inputs(batch, tokens, seed=9)
        assert pyrys.relative_error(opt(*inputs)[1], model(*inputs)[1]) <= 1e-2, (batch, tokens)
    assert not any("could not measure" in note for note in opt.notes), opt.notes


def test_the_stated_error_says_bf16_outputs_are_rounded_after_it(bf16_cpu):
    """With ``output_dtype=torch.bfloat16`` the guard's measure (0.0 here: both linears kept in float32 for a
    budget of 1e-3) is of the outputs before their rounding, which the caller's outputs carry (2.5e-3)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    samples = [(torch.randn(4, 16),) for _ in range(4)]
    rounded = pyrys.optimize(model, samples[0], precision="bf16", calibration=samples, accuracy_budget=1e-3,
                             output_dtype=torch.bfloat16)
    assert any("the error stated is the outputs' before their rounding to bfloat16" in note
               for note in rounded.notes), rounded.notes
    plain = pyrys.optimize(model, samples[0], precision="bf16", calibration=samples, accuracy_budget=1e-3)
    assert not any("before their rounding" in note for note in plain.notes), plain.notes


def test_the_bf16_guards_samples_are_copies_not_the_callers_batches(bf16_cpu):
    """A reviewer's find: samples cut from the caller's batches were views, which kept every batch alive
    for the module's life, and the guard of each later capture measured what the caller wrote there since."""
    model = conv_bn_relu()
    batches = [image(16) for _ in range(2)]
    opt = pyrys.optimize(model, (image(1),), precision="bf16", calibration=batches)
    held = {t.untyped_storage().data_ptr() for sample in opt._config.calibration.samples for t in sample}
    assert held and not held & {batch.untyped_storage().data_ptr() for batch in batches}


def test_a_calibration_sample_the_model_fails_on_is_left_out_of_the_bf16_guard(bf16_cpu):
    """One 100-token sample for a table of 64 positions made the guard measure nothing, every op then in bf16
    over a budget of 1e-3 (a helper's find): the guard measures on the others."""
    from tests.test_int8 import _PositionTable

    torch.manual_seed(0)
    model = _PositionTable().eval()
    samples = [torch.randint(0, 50, (2, length)) for length in (8, 16, 32)] + [torch.randint(0, 50, (2, 100))]
    opt = pyrys.optimize(model, (torch.randint(0, 50, (2, 16)),), precision="bf16", calibration=samples,
                         accuracy_budget=1e-3, dynamic=True, backend="reference")  # (bf16 on any CPU)
    assert any("on 3 of the 4 calibration samples (the model fails on the rest)" in note for note in opt.notes), \
        opt.notes
    x = torch.randint(0, 50, (2, 40))
    assert pyrys.relative_error(opt(x), model(x)) <= 1e-3


def test_a_later_captures_kept_ops_are_named_in_its_note(bf16_cpu):
    """A helper's fuzz: the note of a capture for new shapes said "1 op kept in float32, see misses", and
    ``opt.misses`` (the first capture's) named none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():  # the first linear takes differences of neighbouring features
        model[0].weight.copy_(torch.eye(8) - torch.eye(8).roll(1, 1))
        model[0].bias.zero_()
    opt = pyrys.optimize(model, (torch.randn(2, 8),), precision="bf16", dynamic=False)
    opt(100 + torch.randn(3, 8))  # features near 100: bf16 would erase the differences
    noted = [note for note in opt.notes if note.startswith("the capture for inputs (Float(3, 8))")]
    assert noted and "see misses" not in noted[0] and "kept in float32 by the accuracy guard" in noted[0]


def test_the_guard_rounds_each_op_where_the_lowered_graph_does():
    """``rounded_when_lowered`` reads lowering's own result: a fused ``linear + residual`` on a float32 residual
    (an ``exp``'s) rounds its own arguments only and writes float32; a conv adding another conv's bf16 result (a
    ResNet block's end) reads that in bf16 and writes bf16; a plain linear rounds its arguments and its result.
    (The guard's measure of each op follows it: it charged the residual stream's rounding to the op that adds
    it, and then a rule for one op lowered alone missed ResNet's sums; helpers' finds.)"""
    from pyrys.ir.graph import trial_copy
    from pyrys.passes.precision import _lower, rounded_when_lowered

    def rounding(module, example):
        lowered = trial_copy(pyrys.optimize(module, (example,), backend="reference")._first.captured.gm)
        return rounded_when_lowered(lowered, _lower(lowered, "bf16", None, frozenset())[1])

    residual = Fn(lambda m, x: (m.norm(x.exp() + m.fc(x)), m.head(x)), fc=torch.nn.Linear(8, 8),
                  head=torch.nn.Linear(8, 8), norm=torch.nn.LayerNorm(8)).eval()
    assert rounding(residual, torch.randn(2, 8)) == {
        "linear_2": (frozenset({"xs_0", "fc_weight", "fc_bias"}), False),  # exp's float32 result unrounded
        "linear_1": (frozenset({"xs_0", "head_weight", "head_bias"}), True)}
    block = Fn(lambda m, x: torch.relu(m.b(m.a(x)) + m.c(x)), a=torch.nn.Conv2d(3, 4, 3, padding=1),
               b=torch.nn.Conv2d(4, 4, 3, padding=1), c=torch.nn.Conv2d(3, 4, 1)).eval()
    (read, result), = [value for value in rounding(block, torch.randn(1, 3, 8, 8)).values() if "c_weight" in value[0]]
    assert result and read == {"xs_0", "c_weight", "c_bias", "conv2d_1"}, read  # c adds b's bf16 result, in bf16

def test_a_guard_sample_that_does_not_fit_a_capture_prints_nothing(bf16_cpu, capsys):
    """A batch-1 capture's guard ran samples cut to fit it on a graph unbinding three rows: torch's wrapper of a
    graph module printed the IndexError's traceback to stderr, though pyrys caught it (a helper's find)."""
    torch.manual_seed(0)
    model = Fn(lambda m, x: list(m.linear(x).unbind(0)), linear=torch.nn.Linear(4, 4)).eval()
    opt = pyrys.optimize(model, (torch.randn(3, 5, 4),), precision="bf16")
    opt(torch.randn(5, 5, 4))
    x = torch.randn(1, 5, 4)
    assert all(pyrys.relative_error(a, b) <= BF16_TOLERANCE for a, b in zip(opt(x), model(x)))
    assert "Traceback" not in capsys.readouterr().err
