"""One copy of the weights: after optimize and the first call, the program's packed copy is the only one.

pyrys's private model copy shares the user's tensors instead of copying them (``capture/model_copy.py``),
freezing copies the values it compiles, and a constant the dnnl program holds packed is released
from the graph (``ir/released.py``): the graph keeps its shape, the packed copy its values.  These
tests count live tensors of a distinctive shape, check every path that reads a released weight
again (a new shape, another thread count, NaN inputs, save/load, a torch fallback), and check
that a write to the user's weights after optimize is never compiled silently.
"""
from __future__ import annotations

import copy
import gc
import re
import weakref

import pytest
import torch
from torch import nn

import pyrys
from pyrys.backends import available_backends
from pyrys.backends.threads import with_threads
from pyrys.ir.released import is_released, release, values_of
from tests.conftest import TOLERANCE

pytestmark = pytest.mark.skipif("dnnl" not in available_backends(), reason="the dnnl backend is not available")

OUT, IN = 37, 29  # a conv weight shape no other tensor in the process has


class Net(nn.Module):
    """conv -> BN -> relu -> pool -> flatten -> linear: a folded weight, a plain one, a batch-sized view."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(IN, OUT, 3, padding=1), nn.BatchNorm2d(OUT)
        self.fc = nn.Linear(OUT, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def live_plain_copies() -> int:
    """Live CPU tensors with the conv weight's shape (the user's parameter is one)."""
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if type(o) in (torch.Tensor, nn.Parameter) and not o.is_meta and tuple(o.shape) == (OUT, IN, 3, 3))


def other_thread_count() -> int:
    """A thread count other than this thread's: a call with it builds another program."""
    return 1 if torch.get_num_threads() > 1 else 2


def net_and_input(batch: int = 1):
    return Net().eval(), torch.randn(batch, IN, 8, 8)


def test_the_packed_copy_is_the_only_copy_after_optimize_and_the_first_call():
    model, x = net_and_input()
    assert live_plain_copies() == 1
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        got = opt(x)
        assert (got - model(x)).abs().max() <= TOLERANCE * model(x).abs().max()
    assert live_plain_copies() == 1  # the user's: no private copy, no folded fp32 weight
    released = [name for name, t in opt._first.captured.gm.named_buffers() if is_released(t)]
    assert released and "conv" in opt.graph and "Constant" in opt.graph  # the graph still prints
    with torch.no_grad():  # and opt.graph_module runs: a copy with the released weights restored
        assert torch.allclose(opt.graph_module(x)[0], got, atol=1e-5)
    memory = opt.memory()
    assert memory["weights"] < memory["packed_weights"] / 10


def test_a_released_weight_serves_new_shapes_and_thread_counts():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        opt(x)
        for batch in (2, 3):
            xb = torch.randn(batch, IN, 8, 8)
            assert torch.allclose(opt(xb), model(xb), atol=1e-5)
        threads = other_thread_count()
        assert torch.allclose(with_threads(threads, opt, x), model(x), atol=1e-5)
    assert live_plain_copies() == 1
    assert len(opt._programs) == 3


def test_nan_inputs_run_on_the_restored_weights():
    model = nn.Sequential(Net().conv, nn.MaxPool2d(2)).eval()  # max-pooling: NaN goes to the reference backend
    x = torch.randn(1, IN, 8, 8)
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        opt(x)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        got, want = opt(bad), model(bad)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), atol=1e-5)


def test_save_writes_the_values_of_released_weights(tmp_path):
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        expected = opt(x)
        pyrys.save(opt, tmp_path / "net")
        loaded = pyrys.load(tmp_path / "net")
        assert torch.equal(loaded(x), expected)
        assert any(is_released(t) for t in loaded._first.captured.gm.buffers())


def test_the_optimized_module_keeps_the_weights_of_optimize_time():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        before = opt(x)
        model.fc.bias.add_(1.0)  # read by oneDNN as it lies: a plain copy, not the user's bytes
        model.conv.weight.mul_(2.0)
        assert torch.equal(opt(x), before)


def test_a_new_shape_after_the_user_wrote_the_weights_raises():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        opt(x)
        model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
        opt(x)  # the shape compiled before runs on
        with pytest.raises(pyrys.ModelChangedError, match="conv.weight of Net was written after pyrys.optimize"):
            opt(torch.randn(2, IN, 8, 8))


def test_a_write_through_data_is_seen_too():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        model.fc.weight.data.mul_(2.0)  # no version counter sees this: the CRC does
        with pytest.raises(pyrys.ModelChangedError, match="fc.weight"):
            opt(torch.randn(2, IN, 8, 8))


@pytest.mark.parametrize("dynamic", [False, None])
def test_a_write_while_a_new_shape_compiles_raises_and_keeps_no_program(monkeypatch, dynamic):
    """Another thread writing a weight while a new shape was captured gave that shape (and, under
    dynamic=None, every later one) a program of the new weights, silently (a helper's find): the check
    runs after each compile too."""
    import pyrys.capture.frontend as frontend

    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl", dynamic=dynamic)
        capture = frontend.capture_module

        def capture_then_written(*args, **kwargs):
            captured = capture(*args, **kwargs)
            model.fc.weight.mul_(2.0)  # as if by another thread, while this shape compiles
            return captured

        monkeypatch.setattr(frontend, "capture_module", capture_then_written)
        with pytest.raises(pyrys.ModelChangedError, match="fc.weight"):
            opt(torch.randn(2, IN, 8, 8))
        monkeypatch.setattr(frontend, "capture_module", capture)
        with pytest.raises(pyrys.ModelChangedError, match="fc.weight"):  # nothing of it was kept
            opt(torch.randn(2, IN, 8, 8))


@pytest.mark.parametrize("script", [False, True])
def test_a_write_undone_before_a_new_shape_s_compile_ends_raises(monkeypatch, script):
    """A weight written through ``.data`` while the compile froze it and restored before the check after it
    was in that shape's program, 0.9-1.1 off, every call (a helper's find, with a thread doing
    ``p.data.mul_(2); p.data.div_(2)``): each copy the compile freezes is checked against the weights at
    optimize."""
    import pyrys.capture.frontend as frontend
    import pyrys.passes.freeze as freeze

    model, x = net_and_input()
    module = torch.jit.script(model) if script else model
    with torch.no_grad():
        opt = pyrys.optimize(module, (x,), backend="dnnl", dynamic=False)
        weight = module.fc.weight
        # where the values are copied: as the freeze pass runs, or as a TorchScript import reads the module
        owner, name = (frontend, "capture_torchscript") if script else (freeze, "freeze_params")
        copying = getattr(owner, name)

        def copying_while_written(*args, **kwargs):
            weight.data.mul_(2.0)
            try:
                return copying(*args, **kwargs)
            finally:
                weight.data.div_(2.0)

        monkeypatch.setattr(owner, name, copying_while_written)
        with pytest.raises(pyrys.ModelChangedError, match="fc.weight"):
            opt(torch.randn(2, IN, 8, 8))
        monkeypatch.setattr(owner, name, copying)
        y = torch.randn(2, IN, 8, 8)
        assert pyrys.relative_error(opt(y), model(y)) <= 1e-5  # untouched, it compiles


def test_a_torchscript_module_written_after_optimize_raises_at_a_new_shape():
    """Each shape of a TorchScript module is imported again: from the weights written since (a helper's find)."""
    model, x = net_and_input()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        opt = pyrys.optimize(scripted, (x,))
        before = opt(x)
        scripted.fc.weight.mul_(2.0)
        assert torch.equal(opt(x), before)  # the shape compiled before runs on
        with pytest.raises(pyrys.ModelChangedError, match="fc.weight of .* written after.*imported apart"):
            opt(torch.randn(2, IN, 8, 8))


class HoldsATensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.shift = nn.Linear(8, 8), torch.randn(8)  # a plain tensor attribute: no buffer

    def forward(self, x):
        return self.linear(x) + self.shift


def test_a_torchscript_modules_plain_tensor_attribute_is_checked_too():
    """Its forward reads it as it reads a weight, but only parameters and buffers were checked (a reviewer's
    find: a new shape took the value written)."""
    scripted = torch.jit.script(HoldsATensor().eval())
    opt = pyrys.optimize(scripted, (torch.randn(2, 8),))
    with torch.no_grad():
        scripted.shift.add_(100.0)
    with pytest.raises(pyrys.ModelChangedError, match="shift of"):
        opt(torch.randn(4, 8))


def test_with_freezing_disabled_the_state_is_copied_not_shared():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl", disable=["freeze_params"])
        before = opt(x)
        model.fc.bias.add_(10.0)
        assert torch.equal(opt(x), before)


class TiedConvAndDeconv(nn.Module):
    """A transposed conv sharing the conv's weight: packed directly, and through a transposed view."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Conv2d(8, 16, 3), nn.ConvTranspose2d(16, 8, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_weight_tied_to_a_transposed_conv_serves_new_shapes_and_thread_counts():
    model, x = TiedConvAndDeconv().eval(), torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        threads = other_thread_count()
        assert torch.allclose(with_threads(threads, opt, x), model(x), atol=1e-5)
        x2 = torch.randn(2, 8, 10, 10)
        assert torch.allclose(opt(x2), model(x2), atol=1e-5)


def test_dynamic_true_compiles_every_shape_from_the_weights_at_optimize():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl", dynamic=True)
        x2 = torch.randn(2, IN, 8, 8)
        want = model(x2)
        model.conv.weight.mul_(2.0)
        assert torch.allclose(opt(x2), want, atol=1e-5)
        with pytest.raises(pyrys.ModelChangedError, match="this shape needs one") as refused:  # an image size
            opt(torch.randn(2, IN, 10, 10))  # is captured apart: the advice is not to pass dynamic=True again
        assert "or pass dynamic=True" not in str(refused.value)


def test_state_left_unfrozen_is_copied_not_shared():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl", freeze_params=["running_mean", "running_var"])
        before = opt(x)
        model.conv.weight.mul_(2.0)
        assert torch.equal(opt(x), before)


def test_the_user_model_is_untouched_and_its_tensors_are_not_copied():
    model, x = net_and_input()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    versions = {k: v._version for k, v in model.state_dict().items()}
    with torch.no_grad():
        pyrys.optimize(model, (x,), backend="dnnl")(x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert {k: v._version for k, v in model.state_dict().items()} == versions


def test_dropping_the_module_frees_its_packed_weights():
    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        opt(x)
    packed = weakref.ref(opt._first.program.packed)
    del opt
    gc.collect()
    assert packed() is None


@pytest.fixture
def collector_off():
    """Python's cyclic collector off for the test (``gc.collect()`` still collects), as it was after."""
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if collecting:
        gc.enable()


def test_a_program_and_its_frames_go_with_the_module_without_the_collector(collector_off):
    """A program's idle frames referred back to it: every program called once sat in a cycle, its packed
    weights (and the frames' buffers) freed only by the collector (a helper's find)."""
    from pyrys.backends.dnnl.program import DnnlProgram

    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        opt(x)
        opt(x)
    programs = [weakref.ref(p) for p in opt._first.program.programs.values()]
    assert programs and all(isinstance(p(), DnnlProgram) and p().frames for p in programs)
    del opt
    assert all(p() is None for p in programs)


def test_a_module_freed_is_collected_at_the_next_optimize(collector_off):
    """Its graphs are torch.fx's, cyclic, and hold the weights its program reads as they are: freed by the
    collector alone, which after a load may run many modules later (a model loaded, called and freed ten
    times grew by 7 copies of its weights); the next optimize or load collects once the modules freed held
    32 MiB or more."""
    from pyrys.machine import COLLECT_AFTER_FREED_BYTES

    torch.manual_seed(0)
    model, x = nn.Linear(4096, COLLECT_AFTER_FREED_BYTES // 4 // 4096).eval(), torch.rand(2, 4096)
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        opt(x)
    graph = weakref.ref(opt._first.captured.gm)
    del opt
    assert graph() is not None  # (a cycle: the collector's)
    pyrys.optimize(model, (x,), backend="dnnl")
    assert graph() is None


def test_freeing_a_module_asks_its_program_nothing(monkeypatch):
    """``__del__`` asked the program its memory, which takes the packer's lock: a collection running it under
    that lock (an allocation while a new shape packs) hung the thread, and every compile after (a reviewer's
    find). A dropped copy counted the weights it shares as freed."""
    from pyrys import machine

    model, x = net_and_input()
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        opt(x)
    copied = copy.deepcopy(opt)
    asked = []
    monkeypatch.setattr(type(opt._first.program), "memory", lambda self: asked.append(self) or {})
    before = machine._freed_bytes[0]
    del copied
    assert machine._freed_bytes[0] == before  # (the original holds them)
    del opt
    gc.collect()
    assert not asked and machine._freed_bytes[0] > before


def test_a_stand_in_and_its_views_restore_the_values_exactly():
    tensor = torch.randn(4, 6)
    stand_in = release(tensor, lambda: tensor.clone())
    assert is_released(stand_in) and stand_in.shape == tensor.shape and stand_in.is_meta
    assert torch.equal(values_of(stand_in), tensor)
    view = stand_in.reshape(6, 4)
    assert is_released(view) and torch.equal(values_of(view), tensor.reshape(6, 4))
    assert values_of(tensor) is tensor and not is_released(torch.empty(2, device="meta"))


def test_a_later_capture_is_matched_to_released_weights_by_fingerprint_and_confirmed_byte_for_byte():
    """Two captures share equal constants (``share_constants``); a released one's candidates were each restored
    for a CRC of every byte.  Now the fingerprint its values had at release picks the one to restore, and that
    one is compared whole: a tensor equal at every sampled element but one between them is not shared."""
    from pyrys.ir.fingerprint import SAMPLED
    from pyrys.ir.graph import share_constants

    size = 4 * SAMPLED  # (one of every 4 elements sampled: element 1 is not)
    weights = [torch.randn(size) for _ in range(3)]
    restored = []

    def restore(tensor):
        return lambda: restored.append(tensor) or tensor.clone()

    first = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    for i, weight in enumerate(weights):
        first.register_buffer(f"w{i}", release(weight, restore(weight)))
    later = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    later.register_buffer("same", weights[2].clone())
    unsampled = weights[1].clone()
    unsampled[1] += 1
    later.register_buffer("unsampled", unsampled)
    assert share_constants(later, first) == 1
    assert later.same is first.w2 and later.unsampled is not first.w1
    assert [id(t) for t in restored] == [id(weights[2]), id(weights[1])]  # each candidate whose samples matched


def test_a_later_captures_own_stand_in_is_matched_by_its_fingerprint_too():
    """A reviewer's find: a later capture holding a stand-in itself had no fingerprint to compare (read off a
    meta tensor) and was never shared; each stand-in's own is the one kept at its release."""
    from pyrys.ir.graph import share_constants

    weight = torch.randn(64, 64)
    first = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    first.register_buffer("w", release(weight, lambda: weight.clone()))
    later = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    copy = weight.clone()
    later.register_buffer("w", release(copy, lambda: copy.clone()))
    assert share_constants(later, first) == 1 and later.w is first.w


def test_a_constant_held_under_two_names_is_restored_under_both():
    """Two layers of equal weights share one tensor (a later capture's constants shared with the first's, say):
    ``named_buffers`` lists it once, so a restore or release by name used to leave the other name holding the
    stand-in (a reference run then read a meta tensor: wrong numbers at a new shape's check) or the plain copy."""
    from pyrys.backends.reference import ReferenceProgram
    from pyrys.ir.graph import named_constants

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)))
    weight = torch.randn(4, 4)
    gm.register_buffer("w", weight)
    gm.register_buffer("w_again", weight)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    first = graph.call_function(torch.nn.functional.linear, (x, graph.get_attr("w")))
    graph.output((graph.call_function(torch.nn.functional.linear, (first, graph.get_attr("w_again"))),))
    gm.graph = graph
    gm.recompile()
    assert [name for name, _ in named_constants(gm)][-2:] == ["w", "w_again"]
    stand_in = release(weight, lambda: weight.clone())
    gm.w = gm.w_again = stand_in
    x = torch.randn(3, 4)
    expected = torch.nn.functional.linear(torch.nn.functional.linear(x, weight), weight)
    assert torch.equal(ReferenceProgram(gm)([x])[0], expected)


class GroupedAndTransposed(nn.Module):
    """A grouped conv and a transposed conv, whose weights are packed through views."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(torch.relu(self.grouped(x)))


def test_weights_packed_through_views_stay_correct_across_shapes():
    model, x = GroupedAndTransposed().eval(), torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        for batch in (1, 2, 3):
            xb = torch.randn(batch, 8, 6, 6)
            assert torch.allclose(opt(xb), model(xb), atol=1e-5)


VOCAB, WIDTH = 53, 24  # a shape no other tensor in the process has


class TiedHead(nn.Module):
    """An embedding (a torch fallback reads its table as it lies) tied to a linear head (packed)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.embed(ids)))


def test_a_weight_read_as_it_lies_is_never_released_nor_copied_per_shape():
    model, ids = TiedHead().eval(), torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        opt = pyrys.optimize(model, (ids,), backend="dnnl")
        threads = other_thread_count()
        for batch, length in ((1, 7), (2, 7), (3, 5)):
            xb = torch.randint(0, VOCAB, (batch, length))
            assert torch.allclose(opt(xb), model(xb), atol=1e-5)
            assert torch.allclose(with_threads(threads, opt, xb), model(xb), atol=1e-5)
    gc.collect()
    plain = sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter) and not o.is_meta
                and tuple(o.shape) == (VOCAB, WIDTH))
    assert plain <= 2  # the user's and pyrys's frozen copy, whatever the shapes and thread counts


def test_a_transposed_conv_weight_is_packed_once_for_every_shape():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.ConvTranspose2d(16, 8, 3, stride=2)).eval()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl", layout="nhwc")
        opt(x)
        packed = opt.memory()["packed_weights"]
        for batch in (2, 3):
            xb = torch.randn(batch, 8, 10, 10)
            assert torch.allclose(opt(xb), model(xb), atol=1e-5)
    assert opt.memory()["packed_weights"] == packed  # each shape reads the first shape's packed copies


def test_int8_conv_weights_are_released_whether_the_conv_reads_s8_or_u8():
    """A tester's find: the first conv (its input has negatives: s8) kept its plain int8 weight beside the packed
    one, on AVX2 without VNNI: the check that its weights are even read them as torch code reading them as they
    lie, never released.  Now each int8 weight is held once, packed, and new shapes restore it exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU()).eval()
    x = torch.randn(1, 16, 16, 16)
    calibration = [torch.randn(1, 16, 16, 16) for _ in range(4)]
    with torch.no_grad():
        opt = pyrys.optimize(model, (x,), backend="dnnl", precision="int8", calibration=calibration)
        reference = pyrys.optimize(model, (x,), backend="reference", precision="int8", calibration=calibration)
        opt(x)
        assert re.search(r"int8=\[src=s8.*\n.*int8=\[src=u8", opt.program_text())
        weights = {name: t for name, t in opt._first.program.gm.named_buffers() if t.dtype == torch.int8}
        assert len(weights) == 2 and all(is_released(t) for t in weights.values()), weights.keys()
        xb = torch.randn(2, 16, 12, 12)
        assert pyrys.relative_error(opt(xb), reference(xb)) <= 1e-5


class PositionSlice(nn.Module):
    """``linear(x + pos[:T])``: each length folds its own slice of ``pos``, a constant of that shape alone."""

    def __init__(self):
        super().__init__()
        self.pos, self.linear = nn.Parameter(torch.randn(64, 256)), nn.Linear(256, 8)

    def forward(self, x):
        return self.linear(x + self.pos[:x.shape[1]])


@pytest.mark.skipif("dnnl" not in available_backends(), reason="the dnnl backend packs weights")
@pytest.mark.parametrize("dynamic", [False, None])
def test_signatures_max_shapes_drops_leave_nothing_packed_behind(dynamic):
    """A helper's fuzz: lengths taking turns through ``max_shapes=1`` kept every dropped length's folded slice
    packed in the backend's shared packing (+15 MiB a round of 40 lengths, for ever).  Now what a dropped
    signature alone packed goes with it: the packed bytes stay flat, round after round."""
    model = PositionSlice().eval()
    opt = pyrys.optimize(model, (torch.randn(1, 4, 256),), dynamic=dynamic, max_shapes=1)
    packed = []
    for _ in range(3):
        for length in range(5, 17):
            x = torch.randn(1, length, 256)
            with torch.no_grad():
                assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
        packed.append(opt.memory()["packed_weights"])
    assert packed[0] == packed[1] == packed[2], packed


def test_the_weights_a_new_shapes_check_restores_are_freed_at_once(monkeypatch):
    """A reviewer's find: the check of a new shape's program kept its restored weights alive in the reference's
    graph copy (a reference cycle) until a full collection: a second copy of the weights, for a while."""
    import pyrys.backends.reference as reference

    restored = []
    init = reference.ReferenceProgram.__init__

    def spying(self, gm, *args, **kwargs):
        released = {name for name, t in gm.named_buffers() if is_released(t)}
        init(self, gm, *args, **kwargs)
        restored.extend(weakref.ref(t) for name, t in self.source.named_buffers() if name in released)

    monkeypatch.setattr(reference.ReferenceProgram, "__init__", spying)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    opt = pyrys.optimize(model, (torch.randn(1, 64),), backend="dnnl", dynamic=True)
    gc.collect()
    gc.disable()
    try:
        x = torch.randn(3, 64)  # batch 3: another structure than batch 1's, checked
        assert pyrys.relative_error(opt(x), model(x)) < TOLERANCE
        assert restored and all(ref() is None for ref in restored)
    finally:
        gc.enable()
