"""What around a call an optimized module cannot follow (``pyrys/calling_context.py``): tracers and transforms
get a pyrys error (``torch.jit.trace`` crashed the interpreter), ``torch.autocast`` is not followed (same dtypes
on every backend, a warning; compiles run with it off), a call under another default dtype refuses, and
``train()`` warns that the captured mode stays."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.testing import randomize_batchnorm
from tests.caller_helpers import run_isolated
from tests.models import conv_bn_relu, image

TOLERANCE = pyrys.FP32_TOLERANCE


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


class Attention(nn.Module):
    """A block whose matrix products autocast would run in bf16."""

    def __init__(self):
        super().__init__()
        self.mha, self.norm = nn.MultiheadAttention(16, 2, batch_first=True), nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.mha(x, x, x, need_weights=False)[0])


def _traced_under_jit_trace() -> None:
    opt = pyrys.optimize(_mlp(), (torch.randn(3, 16),))
    opt(torch.randn(3, 16))  # the fast path, which a trace would take, is set up
    for traced in (opt, nn.Sequential(opt, nn.Tanh())):
        with warnings.catch_warnings(), pytest.raises(pyrys.TracedCallError, match="torch.jit.trace"):
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation
            torch.jit.trace(traced, (torch.randn(3, 16),))


def test_jit_trace_of_an_optimized_module_is_refused_not_a_crash():
    """It segfaulted in torch's tracer once the call returned (run in a child: a crash fails the test)."""
    run_isolated(_traced_under_jit_trace)


@pytest.mark.parametrize("transform", ["export", "vmap"])
def test_export_and_vmap_of_an_optimized_module_are_refused(transform):
    x = torch.randn(3, 16)
    opt = pyrys.optimize(_mlp(), (x,))
    opt(x)
    with pytest.raises(pyrys.TracedCallError, match="torch.export" if transform == "export" else "torch.func"):
        if transform == "export":
            torch.export.export(nn.Sequential(opt, nn.Tanh()).eval(), (x,))
        else:
            torch.func.vmap(opt)(torch.randn(2, 3, 16))
    assert pyrys.relative_error(opt(x), _mlp()(x)) <= TOLERANCE  # and it still runs


def test_strict_export_of_a_module_holding_an_optimized_one_says_why_it_cannot():
    """torch's own error, whose hint is to remove the ``torch.compiler.disable``: the reason says why not."""
    x = torch.randn(3, 16)
    opt = pyrys.optimize(_mlp(), (x,))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"reason: pyrys: an optimized module runs compiled oneDNN programs"):
        torch.export.export(nn.Sequential(opt, nn.Tanh()).eval(), (x,), strict=True)


def test_optimizing_a_model_that_holds_an_optimized_module_says_so():
    x = torch.randn(3, 16)
    opt = pyrys.optimize(_mlp(), (x,))
    with pytest.raises(TypeError, match=r"holds a module optimized by pyrys \(at '0'\)"):
        pyrys.optimize(nn.Sequential(opt, nn.Tanh()).eval(), (x,))


@pytest.mark.parametrize("compile_backend", ["inductor", "pyrys"])
def test_torch_compile_of_a_module_holding_an_optimized_one_works(compile_backend):
    """dynamo runs the optimized module as a call it does not trace (it traced into it, warning of the calls
    inside that it could not)."""
    x = torch.randn(3, 16)
    opt = pyrys.optimize(_mlp(), (x,))
    outer = nn.Sequential(opt, nn.Tanh()).eval()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(outer, backend=compile_backend)
        for batch in (3, 5):
            x = torch.randn(batch, 16)
            assert pyrys.relative_error(compiled(x), torch.tanh(_mlp()(x))) <= TOLERANCE
    assert not [w for w in caught if "Dynamo does not know how to trace" in str(w.message)], [str(w.message) for w in caught]


def test_autocast_is_not_followed_and_says_so(backend):
    """The dnnl backend returned float32 and the reference backend (torch ops) autocast's bfloat16: every
    backend runs the program's precision now, with a warning."""
    model = Attention().eval()
    x = torch.randn(2, 5, 16)
    opt = pyrys.optimize(model, (x,), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="autocast is not followed"):
        y = opt(x)
    assert y.dtype == torch.float32
    with torch.no_grad():
        assert pyrys.relative_error(y, model(x)) <= TOLERANCE


def test_a_new_shape_first_called_under_autocast_does_not_put_bf16_in_the_graph():
    """The capture for every later shape, made at that call, recorded autocast's bfloat16 casts: later float32
    calls erred 1e-3."""
    model = Attention().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 5, 16),))
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt(torch.randn(5, 5, 16))
    for x in (torch.randn(5, 5, 16), torch.randn(7, 9, 16)):
        with torch.no_grad():
            assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


class MadeFromTheDefault(nn.Module):
    """Tensors the model makes take torch's default dtype: ``ones``, and an integer range divided by a float."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(x) + torch.ones(8) + torch.arange(x.shape[1]).unsqueeze(-1) / 7.0


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class DividesACount(nn.Module):
    """A count (an integer) divided by 7.0 is made in the default dtype at each call, by a torch step."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(x + (x > 0).long().sum(-1, keepdim=True) / 7.0)


@pytest.mark.parametrize("other", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("build", [MadeFromTheDefault, DividesACount])
def test_a_call_under_another_default_dtype_is_refused(build, other):
    """A new shape first called under another default dtype was captured in it, and every later shape compiled
    from that capture too (float64 outputs, or float32 ones from bf16-rounded constants 7e-4 off), and a
    compiled shape's torch step made a float64 quotient a oneDNN step read as float32 (0.56 off; helpers'
    finds).  The process-wide default is not set back for a call (other threads read it): the call refuses."""
    model = build().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 5, 8),), dynamic=True if build is DividesACount else None)
    with default_dtype(other):
        for shape in [(2, 5, 8), (3, 6, 8)]:  # compiled, and new
            with pytest.raises(pyrys.InputError, match=f"default dtype is {other}.*optimized under torch.float32"):
                opt(torch.randn(shape, dtype=torch.float32))
    for shape in [(2, 5, 8), (3, 6, 8), (4, 9, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            y, want = opt(x), model(x)
        assert y.dtype == want.dtype and pyrys.relative_error(y, want) <= TOLERANCE


def test_a_module_optimized_under_another_default_dtype_follows_it_and_its_save_says_so(tmp_path):
    """A loaded module took the default at load for its own (a review's find): the save keeps it, and a load
    under another refuses (its graphs' types are worked out again)."""
    model = MadeFromTheDefault().eval()
    with default_dtype(torch.float64):
        opt = pyrys.optimize(model, (torch.randn(2, 5, 8, dtype=torch.float32),), dynamic=True)
        pyrys.save(opt, tmp_path / "saved")
        loaded = pyrys.load(tmp_path / "saved")
        for shape in [(2, 5, 8), (3, 6, 8)]:
            x = torch.randn(shape, dtype=torch.float32)
            with torch.no_grad():
                y, want = opt(x), model(x)
            assert y.dtype == want.dtype == torch.float64 and pyrys.relative_error(y, want) <= TOLERANCE
            assert torch.equal(loaded(x), y)
    with pytest.raises(pyrys.LoadError, match="default dtype is torch.float32.*optimized under torch.float64"):
        pyrys.load(tmp_path / "saved")
    with pytest.raises(pyrys.InputError, match="default dtype is torch.float32"):
        loaded(torch.randn(2, 5, 8))


def test_optimize_under_autocast_compiles_float32():
    """The compile-time check against torch ran under autocast: a false oneDNN fault, the reference backend."""
    model = Attention().eval()
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt = pyrys.optimize(model, (x,))
    assert not any("fault" in note for note in opt.notes), opt.notes
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_train_warns_that_the_captured_mode_stays():
    """``opt.train()`` changed ``training`` and nothing else, silently: BatchNorm stayed folded."""
    model = randomize_batchnorm(conv_bn_relu()).eval()
    x = image(2)
    opt = pyrys.optimize(model, (x,))
    assert opt.training is False and opt.compiled_training is False  # the mode it was captured in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.eval()  # the mode it runs: nothing to say
    with pytest.warns(UserWarning, match=r"train\(True\) does not change what an optimized module computes"):
        opt.train()
    assert opt.training is True
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE  # still the eval graph


@pytest.mark.parametrize("conversion", ["half", "double", "bfloat16", "to float64", "to meta", "cuda"])
def test_a_conversion_that_would_change_the_module_is_refused(conversion):
    """``opt.half()``, ``opt.to(torch.float64)``, ``opt.to("meta")`` did nothing, silently."""
    x = torch.randn(3, 16)
    opt = pyrys.optimize(_mlp(), (x,))
    convert = {"half": lambda: opt.half(), "double": lambda: opt.double(), "bfloat16": lambda: opt.bfloat16(),
               "to float64": lambda: opt.to(torch.float64), "to meta": lambda: opt.to("meta"),
               "cuda": lambda: opt.cuda()}[conversion]  # (no GPU: torch's "no NVIDIA driver" before)
    with pytest.raises(TypeError, match="keeps the precision and device it was optimized for"):
        convert()
    assert opt.to("cpu") is opt and opt.float() is opt and opt.to(torch.float32) is opt  # nothing to change
    assert pyrys.relative_error(opt(x), _mlp()(x)) <= TOLERANCE


def test_calls_on_other_threads_run_while_a_thread_exports():
    """``torch.compiler.is_exporting()`` is one flag for the process: read as "this call is exported", every
    plain call on other threads raised while any thread exported (pyrys's own capture of a new shape too)."""
    import threading

    x = torch.randn(3, 16)
    opt = pyrys.optimize(_mlp(), (x,))
    expected = _mlp()(x)
    errors, calls, done = [], [0], threading.Event()

    def call() -> None:
        while not done.is_set():
            try:
                assert pyrys.relative_error(opt(x), expected) <= TOLERANCE
            except Exception as error:  # noqa: BLE001 -- reported below
                errors.append(error)
            calls[0] += 1

    caller = threading.Thread(target=call)
    caller.start()
    try:
        for batch in (4, 5):
            opt(torch.randn(batch, 16))  # new shapes: pyrys exports the model
        torch.export.export(_mlp(), (x,))
    finally:
        done.set()
        caller.join()
    assert calls[0] > 0 and not errors, (calls, errors[:1])


def test_train_warnings_name_the_callers_line():
    """Through ``opt.eval()`` or a parent's ``.train()`` the warning named torch's ``nn.Module`` file."""
    model = randomize_batchnorm(conv_bn_relu())
    opt = pyrys.optimize(model.train(), (image(2),))  # captured in training mode
    with pytest.warns(UserWarning, match=r"train\(False\)") as caught:
        opt.eval()
    assert caught[0].filename == __file__, caught[0].filename
    opt = pyrys.optimize(model.eval(), (image(2),))
    outer = nn.Sequential(opt).eval()
    with pytest.warns(UserWarning, match=r"train\(True\)") as caught:
        outer.train()
    assert caught[0].filename == __file__, caught[0].filename


def test_a_call_under_autocast_warns_at_the_callers_line():
    """Both warnings of one call (autocast, an input requiring grad): the second named torch's file once."""
    opt = pyrys.optimize(_mlp(), (torch.randn(3, 16),))
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu"):
        warnings.simplefilter("always")
        opt(torch.randn(3, 16, requires_grad=True))
    assert len(caught) == 2 and {w.filename for w in caught} == {__file__}, [(w.filename, str(w.message)) for w in caught]


def test_a_call_through_a_forward_hook_warns_at_the_callers_line():
    """A hook adds a frame of torch's between the caller and forward: the counted stacklevel named torch's
    module.py (a reviewer's find); the first frame outside pyrys and torch is named now."""
    opt = pyrys.optimize(_mlp(), (torch.randn(3, 16),))
    handle = opt.register_forward_hook(lambda module, args, output: None)
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu"):
        warnings.simplefilter("always")
        opt(torch.randn(3, 16, requires_grad=True))
    handle.remove()
    assert len(caught) == 2 and {w.filename for w in caught} == {__file__}, [(w.filename, str(w.message)) for w in caught]


class Noisy(nn.Module):
    """A model with noise of its own (a VAE's sampling, a diffusion step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y + 0.1 * torch.randn_like(y)


def test_a_compile_leaves_torch_s_random_generator_as_it_was(tmp_path, monkeypatch):
    """The compile measured the program (a layout per candidate, with a cold tuning cache), whose noise drew
    from the global generator: a seeded first call through torch.compile gave other numbers than eager's
    (a helper's find)."""
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path))  # cold: layouts measured
    model, x = Noisy().eval(), torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pyrys")
    with torch.no_grad():
        for _ in range(2):
            torch.manual_seed(123)
            got = compiled(x)
            torch.manual_seed(123)
            assert torch.allclose(got, model(x), atol=1e-5)
    torch.manual_seed(5)
    pyrys.optimize(model, (torch.randn(1, 3, 12, 12),), layout="auto")
    drawn = torch.rand(4)
    torch.manual_seed(5)
    torch.randn(1, 3, 12, 12)
    assert torch.equal(drawn, torch.rand(4))
