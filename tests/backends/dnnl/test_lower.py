"""Each primitive kind of the dnnl backend against eager PyTorch (and so the reference backend)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrys
from pyrys.backends.dnnl import binding
from pyrys.bench.models import Gpt2Mlp
from tests.conftest import TOLERANCE
from tests.models import Fn

available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")


def seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.uniform_(-0.5, 0.5)
    return module.eval()


def rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


CASES = {
    "conv2d": (lambda: Fn(lambda m, x: m.c(x), c=nn.Conv2d(8, 16, 3, padding=1)), [rand(1, 8, 10, 10)]),
    "conv2d_stride2_dilation2": (lambda: Fn(lambda m, x: m.c(x), c=nn.Conv2d(8, 16, 3, 2, padding=2, dilation=2)),
                                 [rand(2, 8, 11, 11)]),
    "conv2d_groups": (lambda: Fn(lambda m, x: m.c(x), c=nn.Conv2d(8, 16, 3, groups=4, bias=False)), [rand(1, 8, 9, 9)]),
    "conv2d_depthwise": (lambda: Fn(lambda m, x: m.c(x), c=nn.Conv2d(16, 16, 3, padding=1, groups=16)),
                         [rand(1, 16, 12, 12)]),
    "conv1d": (lambda: Fn(lambda m, x: m.c(x), c=nn.Conv1d(4, 8, 5, padding=2)), [rand(1, 4, 20)]),
    "conv3d": (lambda: Fn(lambda m, x: m.c(x), c=nn.Conv3d(4, 8, 3)), [rand(1, 4, 6, 6, 6)]),
    "conv_asymmetric_padding": (lambda: Fn(lambda m, x: m.c(F.pad(x, (0, 1, 0, 1))), c=nn.Conv2d(4, 8, 3, 2)),
                                [rand(1, 4, 8, 8)]),
    "conv_relu6": (lambda: Fn(lambda m, x: F.relu6(m.c(x)), c=nn.Conv2d(4, 8, 3)), [rand(1, 4, 8, 8) * 4]),
    "conv_transpose2d": (lambda: Fn(lambda m, x: m.c(x), c=nn.ConvTranspose2d(8, 4, 3, 2, 1, output_padding=1)),
                         [rand(1, 8, 5, 5)]),
    "conv_transpose2d_groups": (lambda: Fn(lambda m, x: m.c(x), c=nn.ConvTranspose2d(8, 6, 2, 2, groups=2)),
                                [rand(1, 8, 4, 4)]),
    "linear": (lambda: Fn(lambda m, x: m.l(x), l=nn.Linear(16, 10)), [rand(3, 16)]),
    "linear_3d_gelu": (lambda: Fn(lambda m, x: F.gelu(m.l(x)), l=nn.Linear(16, 10)), [rand(2, 5, 16)]),
    "max_pool": (lambda: Fn(lambda m, x: F.max_pool2d(x, 3, 2, 1)), [rand(1, 8, 11, 11)]),
    "max_pool_ceil": (lambda: Fn(lambda m, x: F.max_pool2d(x, 3, 2, ceil_mode=True)), [rand(1, 8, 10, 10)]),
    "avg_pool": (lambda: Fn(lambda m, x: F.avg_pool2d(x, 2, 2)), [rand(1, 8, 10, 10)]),
    "avg_pool_pad_exclude": (lambda: Fn(lambda m, x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
                             [rand(1, 8, 6, 6)]),
    "global_avg_pool": (lambda: Fn(lambda m, x: F.adaptive_avg_pool2d(x, 1)), [rand(2, 8, 7, 7)]),
    "adaptive_avg_pool_even": (lambda: Fn(lambda m, x: F.adaptive_avg_pool2d(x, 2)), [rand(1, 8, 8, 8)]),
    "mean": (lambda: Fn(lambda m, x: x.mean((2, 3))), [rand(2, 8, 5, 5)]),
    "mean_keepdim": (lambda: Fn(lambda m, x: x.mean((2, 3), keepdim=True)), [rand(2, 8, 5, 5)]),
    "binary_broadcast": (lambda: Fn(lambda m, x, s: x * s + x), [rand(1, 8, 5, 5), rand(1, 8, 1, 1)]),
    "binary_sub_div": (lambda: Fn(lambda m, x, y: (x - y) / (y * y + 1)), [rand(2, 3, 4), rand(2, 3, 4)]),
    "scalar_ops": (lambda: Fn(lambda m, x: (x + 1.5) * 2 - 0.5), [rand(2, 3, 4)]),
    "concat": (lambda: Fn(lambda m, x, y: torch.cat([torch.relu(x), y], 1)), [rand(1, 8, 5, 5), rand(1, 4, 5, 5)]),
    "softmax": (lambda: Fn(lambda m, x: torch.softmax(x, -1)), [rand(2, 3, 10)]),
    "log_softmax": (lambda: Fn(lambda m, x: torch.log_softmax(x, 1)), [rand(4, 10)]),
    "layer_norm": (lambda: Fn(lambda m, x: m.n(x), n=nn.LayerNorm(16)), [rand(2, 5, 16)]),
    "batch_norm_unfolded": (lambda: Fn(lambda m, x, y: m.bn(torch.cat([x, y], 1)), bn=nn.BatchNorm2d(8)),
                            [rand(1, 4, 5, 5), rand(1, 4, 5, 5)]),
    "upsample_nearest": (lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest")), [rand(1, 4, 5, 5)]),
    "upsample_bilinear": (lambda: Fn(lambda m, x: F.interpolate(x, size=(9, 7), mode="bilinear")), [rand(1, 4, 5, 5)]),
    "eltwise_chain": (lambda: Fn(lambda m, x: F.hardswish(torch.sigmoid(F.silu(torch.tanh(F.elu(x)))))),
                      [rand(2, 8, 4, 4)]),
    "views": (lambda: Fn(lambda m, x: m.l(torch.flatten(torch.relu(m.c(x)), 1)), c=nn.Conv2d(3, 4, 3), l=nn.Linear(36, 5)),
              [rand(1, 3, 5, 5)]),
    "permute_layer_norm": (lambda: Fn(lambda m, x: m.n(m.c(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x,
                                      c=nn.Conv2d(8, 8, 3, padding=1, groups=8), n=nn.LayerNorm(8)),
                           [rand(1, 8, 6, 6)]),
    "channel_shuffle": (lambda: Fn(lambda m, x: torch.flatten(m.c(x).view(1, 2, 4, 5, 5).transpose(1, 2), 1, 2) * 2,
                                   c=nn.Conv2d(8, 8, 1)), [rand(1, 8, 5, 5)]),
    "fallback_op": (lambda: Fn(lambda m, x: torch.cumsum(m.c(x), dim=1), c=nn.Conv2d(3, 4, 3)), [rand(1, 3, 5, 5)]),
    "tuple_fallback": (lambda: Fn(lambda m, x: sum(torch.split(m.c(x), 2, dim=1)), c=nn.Conv2d(3, 4, 1)),
                       [rand(1, 3, 5, 5)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_primitive_matches_eager(name):
    make, inputs = CASES[name]
    model = seeded(make())
    opt = pyrys.optimize(model, tuple(inputs), backend="dnnl")
    with torch.no_grad():
        expected = model(*inputs)
        assert pyrys.relative_error(opt(*inputs), expected) <= TOLERANCE
        assert pyrys.relative_error(opt(*inputs), expected) <= TOLERANCE  # a second call reuses the buffers
    assert opt.backend == "dnnl"


@pytest.mark.parametrize("name, label", [
    ("conv2d", "dnnl::conv2d"), ("conv_transpose2d", "dnnl::conv_transpose2d"), ("linear", "dnnl::linear"),
    ("max_pool", "dnnl::pooling_max"), ("global_avg_pool", "dnnl::pooling_avg"), ("mean", "dnnl::pooling_avg"),
    ("binary_broadcast", "dnnl::mul"), ("mean_keepdim", "dnnl::pooling_avg"), ("scalar_ops", "dnnl::shift"), ("concat", "dnnl::concat"),
    ("softmax", "dnnl::softmax"), ("layer_norm", "dnnl::layer_norm"), ("batch_norm_unfolded", "dnnl::batch_norm"),
    ("upsample_nearest", "dnnl::resampling_nearest"), ("upsample_bilinear", "dnnl::resampling_linear"),
    ("eltwise_chain", "dnnl::hardswish"), ("conv_relu6", "dnnl::conv2d_clamp"),
    ("permute_layer_norm", "dnnl::layer_norm"), ("channel_shuffle", "dnnl::reorder"),
])
def test_each_kind_is_lowered_to_onednn(name, label):
    make, inputs = CASES[name]
    opt = pyrys.optimize(seeded(make()), tuple(inputs), backend="dnnl")
    text = opt.program_text()
    assert label in text
    assert fallbacks(text) == []


def fallbacks(program_text: str) -> list[str]:
    """The ops of a program's steps that run through torch (``torch::pad``, ...)."""
    return [line.split(" = ")[1].split("(")[0] for line in program_text.splitlines() if "# fallback" in line]


def test_asymmetric_padding_is_the_conv_s_own_no_fallback():
    make, inputs = CASES["conv_asymmetric_padding"]
    text = pyrys.optimize(seeded(make()), tuple(inputs), backend="dnnl").program_text()
    assert "dnnl::conv2d[" in text
    assert fallbacks(text) == []  # the zero pad is the conv's padding, begin and end (passes/legalize.py)


def test_unsupported_op_falls_back_to_torch_with_a_reason():
    make, inputs = CASES["fallback_op"]
    opt = pyrys.optimize(seeded(make()), tuple(inputs), backend="dnnl")
    assert "torch::cumsum" in opt.program_text() and "# fallback: no oneDNN lowering" in opt.program_text()


def test_outputs_are_fresh_tensors_in_eager_layout():
    make, inputs = CASES["conv2d"]
    model = seeded(make())
    opt = pyrys.optimize(model, tuple(inputs), backend="dnnl")
    first = opt(*inputs)
    second = opt(*inputs)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, second)
    assert first.is_contiguous() and first.shape == model(*inputs).shape


def test_program_reports_memory_and_reorders_weights_once():
    make, inputs = CASES["views"]
    opt = pyrys.optimize(seeded(make()), tuple(inputs), backend="dnnl")
    program = opt._first.program
    assert program.peak_activation_bytes > 0 and program.weight_bytes >= (4 * 3 * 9 + 4 + 36 * 5 + 5) * 4
    assert "peak activation memory" in program.describe()


def test_policy_can_be_forced_and_new_batch_compiles():
    from pyrys.backends.dnnl.runtime import compile_program
    from pyrys.backends.options import BackendOptions

    make, inputs = CASES["conv2d_depthwise"]
    model = seeded(make())
    opt = pyrys.optimize(model, tuple(inputs), backend="dnnl")
    for policy in ("nhwc", "blocked8"):
        program = compile_program(opt.graph_module, list(inputs), BackendOptions(layout=policy))
        assert program.policy == policy
        assert pyrys.relative_error(program(list(inputs))[0], model(*inputs)) <= TOLERANCE
    x = rand(3, 16, 12, 12)
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_non_contiguous_input_is_handled():
    make, inputs = CASES["conv2d"]
    model = seeded(make())
    opt = pyrys.optimize(model, tuple(inputs), backend="dnnl")
    x = inputs[0].to(memory_format=torch.channels_last)
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


class ViewsOfPlannedBuffers(nn.Module):
    """torch fallbacks that return views (split, transpose) of oneDNN buffers, read long after."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        first, second = torch.split(self.a(x), 4, dim=1)
        later = self.c(torch.relu(self.b(second)))
        return first.transpose(2, 3) + later.transpose(2, 3)


def test_fallback_views_keep_their_buffers_alive():
    model = ViewsOfPlannedBuffers().eval()
    x = rand(1, 4, 6, 5)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_residual_that_is_also_the_conv_input_is_not_overwritten_in_place():
    from pyrys.ir.fused import read_fused

    class SelfResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.conv = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.pre(x)
            return self.conv(y) + y

    model = seeded(SelfResidual())
    x = rand(1, 4, 6, 6)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    fused = [f for f in map(read_fused, opt.graph_module.graph.nodes) if f and "add" in [p.name for p in f.post_ops]]
    assert len(fused) == 1  # the pass fused the add: the lowering must not write into the conv's own input
    assert "dnnl::conv2d_add" in opt.program_text()
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_threads_option_pins_threads_per_call_and_restores_them():
    make, inputs = CASES["conv2d"]
    model = seeded(make())
    seen = []
    opt = pyrys.optimize(model, tuple(inputs), backend="dnnl", threads=1)
    runtime = opt._first.program
    assert list(runtime.programs) == [1] and runtime.first.threads == 1  # primitives created for 1 thread
    inner = runtime.programs[1]
    runtime.programs = {1: lambda xs: seen.append(torch.get_num_threads()) or inner(xs)}
    before = torch.get_num_threads()
    assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= TOLERANCE
    assert seen == [1] and torch.get_num_threads() == before


def test_bad_threads_and_layout_options_are_rejected():
    make, inputs = CASES["conv2d"]
    with pytest.raises(ValueError, match="threads must be None or an int from 1 to"):
        pyrys.optimize(seeded(make()), tuple(inputs), threads=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        pyrys.optimize(seeded(make()), tuple(inputs), layout="nchw16")


def test_permutes_are_free_views_between_channels_last_ops():
    make, inputs = CASES["permute_layer_norm"]
    opt = pyrys.optimize(seeded(make()), tuple(inputs), backend="dnnl", layout="nhwc")
    text = opt.program_text()
    assert "torch::permute" not in text
    assert "dnnl::reorder[format_info=[acdb -> abcd]](%conv2d" not in text  # the nhwc conv output is read as is


def test_mean_over_other_dims_is_a_reduction():
    model = seeded(Fn(lambda m, x: x.mean(1)))
    x = rand(2, 8, 5)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "dnnl::reduction_mean" in opt.program_text()
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_split_parts_are_views_of_the_source():
    model = seeded(Fn(lambda m, x: torch.cat([m.a(torch.split(m.c(x), [3, 5], 1)[1]), torch.split(m.c(x), [3, 5], 1)[0]], 1),
                      c=nn.Conv2d(4, 8, 1), a=nn.Conv2d(5, 5, 3, padding=1)))
    x = rand(1, 4, 6, 6)
    opt = pyrys.optimize(model, (x,), backend="dnnl", layout="nhwc")
    assert "torch::split" not in opt.program_text()
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_a_part_that_starts_inside_its_source_is_read_from_its_start():
    """A part's start is added to the memory handle (oneDNN's matmul ignored a descriptor's own start with one
    batch), and a torch step reading the part views it from there."""
    def parts(m, x):
        a, b = m.l(x).split([2, 3], 0)
        return torch.cumsum(b, -1), m.o(b), m.o(a), b.unsqueeze(0) @ m.w

    model = seeded(Fn(parts, l=nn.Linear(8, 8), o=nn.Linear(8, 4)))
    model.register_buffer("w", rand(8, 3))
    x = rand(5, 8)
    opt = pyrys.optimize(model, (x,))
    assert "torch::split" not in opt.program_text()
    for out, expected in zip(opt(x), model(x)):
        assert pyrys.relative_error(out, expected) <= TOLERANCE


def test_unbind_parts_are_views_of_the_source():
    """``q, k, v = qkv(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)``: each a strided view, no copy."""
    def heads(m, x):
        q, k, v = m.l(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return torch.relu(q) + k * v

    model = seeded(Fn(heads, l=nn.Linear(8, 24)))
    x = rand(2, 5, 8)
    opt = pyrys.optimize(model, (x,))
    text = opt.program_text()
    assert "torch::unbind" not in text and "permute.reorder" not in text, text
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(12, 12, 3, padding=1, groups=3),  # group width 4: no blocked kernel
    lambda: nn.ConvTranspose2d(12, 6, 2, 2, groups=2),  # blocked and plain sources: reference code only
])
def test_convs_the_blocked_kernels_do_not_cover_run_channels_last(make):
    from pyrys.backends.dnnl.layout import native_blocked_policy

    model = seeded(Fn(lambda m, x: torch.relu(m.c(x)), c=make()))
    x = rand(1, 12, 6, 6)
    opt = pyrys.optimize(model, (x,), backend="dnnl", layout=native_blocked_policy())
    text = opt.program_text()
    assert "dst=acdb" in text and "ref:" not in text
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_gpt2_conv1d_is_a_fused_onednn_linear_at_every_sequence_length():
    model, x = Gpt2Mlp(width=16).eval(), torch.randn(1, 12, 16)  # HF's Conv1D: view -> addmm -> view
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl", dynamic=True)
        text = opt.program_text()
        assert "dnnl::linear_gelu_tanh" in text and "dnnl::linear_add" in text and "addmm" not in text
        for length in (12, 5, 31):
            xs = torch.randn(2, length, 16)
            assert pyrys.relative_error(opt(xs), model(xs)) <= TOLERANCE


def test_a_linear_over_3d_rows_writes_its_output_straight_into_the_callers_tensor():
    model = seeded(Fn(lambda m, x: m.l(torch.relu(x)), l=nn.Linear(16, 10)))
    x = rand(2, 5, 16)
    opt = pyrys.optimize(model, (x,))
    first, second = opt(x), opt(x * 2)
    assert "dnnl::reorder" not in opt.program_text(), opt.program_text()  # no copy of the rows into the output
    assert first.shape == (2, 5, 10) and first.data_ptr() != second.data_ptr()
    assert torch.allclose(first, model(x), atol=1e-5) and torch.allclose(second, model(x * 2), atol=1e-5)


@pytest.mark.parametrize("name, fn", [
    ("transposed", lambda m, x: m.l(x).transpose(1, 2)),
    ("chunked", lambda m, x: m.l(x).chunk(2, -1)),
    ("reshaped twice", lambda m, x: (m.l(x).reshape(-1), m.l(x).view(10, 5))),
])
def test_outputs_viewing_a_linears_rows_are_their_own_shape(name, fn):
    model = seeded(Fn(fn, l=nn.Linear(16, 10)))
    x = rand(5, 16) if name == "reshaped twice" else rand(2, 5, 16)
    opt = pyrys.optimize(model, (x,))
    got, expected = opt(x), model(x)
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected], name
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected)), name


class RMSNorm(nn.Module):
    """LLaMA's and T5's norm: ``w * x * rsqrt(mean(x^2) + eps)``."""

    def __init__(self, width=16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_an_rms_norm_runs_in_onednn():
    model, x = RMSNorm().eval(), rand(2, 5, 16)
    opt = pyrys.optimize(model, (x,))
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    text = opt.program_text()
    assert "fallback" not in text and "dnnl::rsqrt" in text and "dnnl::pow" in text, text


@pytest.mark.parametrize("op, reason", [(torch.rsqrt, "rsqrt of a value not known positive"),
                                        (lambda x: x.pow(3), "pow to 3")])
def test_elementwise_math_oneDNN_computes_unlike_torch_stays_torch(op, reason):
    model = Fn(lambda m, x: op(x * 1.0))
    x = torch.tensor([[-0.0, 0.0, -math.inf, 4.0, -2.0, math.nan]])
    opt = pyrys.optimize(model, (x,))
    got, want = opt(x), model(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])
    assert torch.equal(torch.signbit(got[~want.isnan()]), torch.signbit(want[~want.isnan()]))
    assert reason in opt.program_text(), opt.program_text()


@pytest.mark.parametrize("op", [torch.sqrt, torch.abs, torch.neg, lambda x: x.pow(2)])
def test_elementwise_math_in_onednn_keeps_nan_infinities_and_signed_zeros(op):
    model = Fn(lambda m, x: op(x * 1.0))
    x = torch.tensor([[-0.0, 0.0, -math.inf, math.inf, 4.0, -2.0, math.nan, 1e-40, 2.0]])
    opt = pyrys.optimize(model, (x,))
    got, want = opt(x), model(x)
    assert "fallback" not in opt.program_text(), opt.program_text()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.signbit(got[~want.isnan()]), torch.signbit(want[~want.isnan()]))
    torch.testing.assert_close(got[~want.isnan()], want[~want.isnan()], rtol=2e-7, atol=0)


def rotate_half(x):
    """RoPE's rotation: the halves of the last dim swapped, the first negated."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


VIEW_CASES = {
    "RoPE halves": lambda x: x * 0.5 + rotate_half(x * 2.0),
    "slices of slices": lambda x: (x * 2.0)[:, 1:4][..., 2:-1] + 1,
    "a slice from the end": lambda x: (x * 2.0)[..., -3:].relu(),
    "grouped-query keys: expand, then reshape": lambda x: (x * 2.0)[:, None].expand(2, 3, 5, 12).reshape(6, 5, 12),
    "an expand read directly": lambda x: (x * 2.0)[:1].expand(2, 5, 12) - x,
}


@pytest.mark.parametrize("name", list(VIEW_CASES))
def test_slices_and_expands_of_computed_tensors_run_in_onednn(name):
    model, x = Fn(lambda m, x: VIEW_CASES[name](x)), rand(2, 5, 12)
    opt = pyrys.optimize(model, (x,))
    assert torch.equal(opt(x), model(x))
    assert "fallback" not in opt.program_text(), opt.program_text()
    other = rand(2, 5, 12) * 3  # the same program, other values: the views read the new ones
    assert torch.equal(opt(other), model(other))


def test_a_slice_with_a_step_runs_in_torch_and_says_why():
    model, x = Fn(lambda m, x: (x * 2.0)[:, ::2] + 1), rand(2, 5, 12)
    opt = pyrys.optimize(model, (x,))
    assert torch.equal(opt(x), model(x)) and "a slice with a step" in opt.program_text()


def test_an_empty_operand_of_a_concat_is_dropped(run_passes):
    class Cache(nn.Module):
        def forward(self, x):
            past = torch.zeros(x.shape[0], 0, x.shape[2])
            return torch.cat([past, x * 2.0], 1) + torch.cat([past, x, x + 1], 1)[:, :5]

    result = run_passes(Cache(), (rand(2, 5, 12),), "constant_propagation", "simplify")
    assert result.fired("simplify").get("concat_without_empty") == 2, result.after
    assert "aten::cat([%x, %add], 1)" in result.after and result.error() == 0


@pytest.mark.parametrize("name, fn", [
    ("view", lambda y: y.view(()) * 2.0),  # HF TimeSeriesTransformer's and Informer's scaler
    ("reshape", lambda y: y.reshape(()) + y.view(())),
    ("squeeze", lambda y: y.squeeze().sigmoid()),
])
def test_a_view_to_no_dims_stays_torch_s(name, fn):
    """A helper's find: ``linear(x).view(())`` raised "oneDNN has no rank-0 memory descriptor" from the lowering."""
    torch.manual_seed(0)
    model, x = Fn(lambda m, x: fn(m.lin(x)), lin=nn.Linear(4, 1)).eval(), torch.randn(1, 4)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    y = torch.randn(1, 4)
    assert pyrys.relative_error(opt(y), model(y)) < TOLERANCE


@pytest.mark.parametrize("bounds", [(0.0, None), (-0.5, None), (None, 0.25), (-0.3, 0.4)])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_a_clamp_with_one_bound_runs_fused_as_eager_has_it(bounds, layer):
    """An open bound is an infinite one in oneDNN's clip (``min=0`` alone: a relu)."""
    torch.manual_seed(0)
    low, high = bounds
    module, x = (nn.Conv2d(3, 8, 3), torch.randn(2, 3, 9, 9)) if layer == "conv" else (nn.Linear(16, 8), torch.randn(5, 16))
    model = Fn(lambda m, x: torch.clamp(m.layer(x), low, high), layer=module).eval()
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    fused = [line for line in opt.program_text().splitlines() if f"dnnl::{layer}" in line]
    assert len(fused) == 1 and ("_relu" in fused[0] or "_clamp" in fused[0]), opt.program_text()
    for scale in (1.0, 100.0):
        assert pyrys.relative_error(opt(x * scale), model(x * scale)) <= TOLERANCE
