"""The dnnl runtime's own structure: frames per call, a program per thread count, user scratchpads."""
import copy
import threading
import warnings

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.backends.dnnl import binding
from pyrys.backends.threads import with_threads
from pyrys.backends.dnnl.constants import ARG_SCRATCHPAD
from pyrys.backends.dnnl.descriptors import convolution_pd
from pyrys.backends.dnnl.layout import any_md, policy_md
from pyrys.backends.dnnl.primitives import Engine, PrimitiveAttr
from pyrys.backends.thread_choice import FIRST_INTERVAL, SLOW_SCORE
from pyrys.backends.threads import PER_CALLER_THREADS, current_threads
from pyrys.ir.released import is_released
from tests.conftest import TOLERANCE

available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()


def run_threads(count: int, work) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            work(index)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_primitives_take_the_callers_scratchpad():
    """A primitive made with pyrys's attributes asks for its scratchpad (oneDNN's user mode): in
    library mode the same conv reports none, because the library keeps one per primitive."""
    engine = Engine()
    src = policy_md((1, 64, 28, 28), torch.float32, "nhwc")

    def scratchpad_bytes(attr):
        pd = convolution_pd(engine, src, any_md((64, 64, 3, 3), torch.float32), src, strides=[1, 1],
                            padding_l=[1, 1], attr=attr)
        return pd.scratchpad_md().size()

    assert scratchpad_bytes(PrimitiveAttr(user_scratchpad=False)) == 0
    assert scratchpad_bytes(None) > 0 and scratchpad_bytes(PrimitiveAttr()) > 0


def test_each_frame_brings_its_own_scratchpad():
    x = torch.randn(1, 3, 28, 28)
    program = pyrys.optimize(small_net(), (x,), backend="dnnl", layout="nhwc")._first.program.first
    from pyrys.backends.dnnl.frame import Frame

    first, second = Frame(program), Frame(program)
    assert first.scratchpad.data_ptr() != second.scratchpad.data_ptr()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.buffers, second.buffers))
    bound = [call.__self__ for call in first.calls if hasattr(call, "__self__")]
    scratch = [c.exec_args.memories[ARG_SCRATCHPAD] for c in bound if ARG_SCRATCHPAD in c.exec_args.memories]
    assert all(m.data_ptr() == first.scratchpad.data_ptr() for m in scratch)


def test_frames_grow_to_the_callers_running_at_once_and_are_reused():
    model, x = small_net(), torch.randn(1, 3, 16, 16)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    program = opt._first.program.programs[current_threads()]
    for _ in range(5):
        opt(x)
    assert program.frames == 1  # one caller at a time: one frame, reused
    expected = model(x)
    results = [[] for _ in range(4)]
    run_threads(4, lambda i: results[i].extend(opt(x) for _ in range(20)))
    assert 1 <= program.frames <= 4
    assert all(pyrys.relative_error(y, expected) <= TOLERANCE for per in results for y in per)


def test_a_caller_with_another_thread_count_gets_a_program_built_for_it():
    model, x = small_net(), torch.randn(1, 3, 16, 16)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    runtime, own = opt._first.program, current_threads()
    other = 1 if own != 1 else 2
    seen = {}

    def call_with(index: int) -> None:
        torch.get_num_threads()  # (torch gives a new thread the process's count at its first such call)
        torch.set_num_threads(other if index % 2 else own)
        seen[index] = pyrys.relative_error(opt(x), model(x))

    run_threads(4, call_with)
    assert max(seen.values()) <= TOLERANCE
    assert {own, other} <= set(runtime.programs)  # (busy CPUs may have added a count between: thread_choice)
    assert runtime.programs[other].threads == other and runtime.programs[other].policy == runtime.first.policy
    weights = {slot.constant.data_ptr() for p in runtime.programs.values() for slot in p.slots if slot.constant is not None}
    first_weights = {slot.constant.data_ptr() for slot in runtime.first.slots if slot.constant is not None}
    assert weights == first_weights  # the second program packed nothing again


def test_a_model_optimized_in_inference_mode_gets_programs_for_other_thread_counts():
    """Stand-ins of released weights made in inference mode (torch.compile compiles at a call, under the
    caller's) were inference tensors, whose detached copies keep no base: a later thread count's program found
    no values to pack."""
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        model = small_net()
        opt = pyrys.optimize(model, (x,), backend="dnnl")
    runtime, own = opt._first.program, current_threads()
    other = 1 if own != 1 else 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a program that fails to build warns
        with torch.inference_mode():
            assert pyrys.relative_error(with_threads(other, opt, x), model(x)) <= TOLERANCE
    assert other in runtime.programs


def adapting_after_warm_up(model: nn.Module, x: torch.Tensor):
    """``model`` optimized and called until its thread chooser may probe: (opt, runtime, own count, chooser)."""
    if current_threads() < 2 or not PER_CALLER_THREADS:
        pytest.skip("one thread per call here, or no per-caller thread count: nothing to choose from")
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    runtime, own = opt._first.program, current_threads()
    assert "no call" in opt.thread_choice()
    for _ in range(FIRST_INTERVAL):
        opt(x)
    return opt, runtime, own, runtime.choosers[own]


def test_busy_cpus_move_calls_to_fewer_threads_with_the_same_outputs():
    """The chooser's decisions are unit-tested in tests/backends/test_thread_choice.py; here its probe of a
    lower count (as a slowdown triggers it) builds that program, and calls run on it, right."""
    model, x = small_net(), torch.randn(1, 3, 16, 16)
    opt, runtime, own, chooser = adapting_after_warm_up(model, x)
    chooser.slow_score = SLOW_SCORE  # as if the CPUs had got busier: the next call probes own // 2
    y = opt(x)
    assert own // 2 in runtime.programs and f"up to {own} threads" in opt.thread_choice()
    assert pyrys.relative_error(y, model(x)) <= TOLERANCE
    assert with_threads(1, opt.thread_choice).startswith("1 thread (the caller's")  # what a 1-thread caller runs
    pinned = pyrys.optimize(model, (x,), backend="dnnl", threads=own)
    pinned(x)
    assert not pinned._first.program.choosers and "pins" in pinned.thread_choice()


def test_a_probe_whose_program_another_caller_is_building_runs_the_active_count():
    model, x = small_net(), torch.randn(1, 3, 16, 16)
    opt, runtime, own, chooser = adapting_after_warm_up(model, x)
    chooser.slow_score = SLOW_SCORE
    with runtime._building:  # another caller building the lower count's program
        y = opt(x)
    assert own // 2 not in runtime.programs and chooser.probing is None and chooser.active == own
    assert pyrys.relative_error(y, model(x)) <= TOLERANCE


def test_a_probe_whose_program_fails_to_build_runs_the_active_count_and_is_not_tried_again(monkeypatch):
    from pyrys.backends.dnnl import runtime as runtime_module

    model, x = small_net(), torch.randn(1, 3, 16, 16)
    opt, runtime, own, chooser = adapting_after_warm_up(model, x)
    builds = []

    def out_of_memory(*args, **kwargs):
        builds.append(args[3])
        raise MemoryError("no room for the frames")

    monkeypatch.setattr(runtime_module, "build_program", out_of_memory)
    for attempt in range(3):
        chooser.slow_score = SLOW_SCORE  # as if the CPUs were busy: the next call probes own // 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = opt(x)
        assert [str(w.message) for w in caught if "failed to build" in str(w.message)] == (
            [f"pyrys: the program for {own // 2} threads failed to build (MemoryError: no room for the frames); "
             "calls keep their thread count"] if attempt == 0 else [])
        assert pyrys.relative_error(y, model(x)) <= TOLERANCE
    assert builds == [own // 2] and chooser.active == own and own // 2 not in runtime.programs
    assert "failed to build (MemoryError: no room for the frames)" in opt.thread_choice()


def test_deepcopy_shares_the_compiled_plan_but_not_the_frames():
    model, x = small_net(), torch.randn(1, 3, 16, 16)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    opt(x)
    twin = copy.deepcopy(opt)
    original, copied = opt._first.program.first, twin._first.program.first
    assert copied is not original and copied.steps is original.steps and copied.frames == 0
    del opt
    assert pyrys.relative_error(twin(x), model(x)) <= TOLERANCE


def test_only_programs_with_a_step_unlike_eager_on_nonfinite_values_check_their_inputs():
    x = torch.randn(1, 3, 16, 16)
    conv_sigmoid = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid()).eval()
    assert pyrys.optimize(conv_sigmoid, (x,), backend="dnnl")._first.program.float_inputs == []
    assert pyrys.optimize(small_net(), (x,), backend="dnnl")._first.program.float_inputs == [0]  # its relu


def test_calls_with_a_nan_or_an_infinity_in_an_input_run_on_the_reference_backend():
    model, x = nn.Sequential(small_net(), nn.MaxPool2d(2)).eval(), torch.randn(1, 3, 16, 16)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert opt._first.program.float_inputs == [0]
    runtime, referred = opt._first.program, []
    reference = runtime.reference  # made at the first call that needs it: the released weights restored
    assert not any(is_released(t) for t in reference.gm.buffers())
    runtime._reference = lambda inputs: referred.append(True) or reference(inputs)
    opt(x)
    assert not referred
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = x.clone()
        bad[0, 1, 2, 3] = value
        got, want = opt(bad), model(bad)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert len(referred) == 3


def test_the_losing_layout_candidate_is_freed_before_optimize_returns(monkeypatch):
    import gc
    import weakref

    from pyrys.backends.dnnl import runtime

    built = []
    original = runtime.build_program

    def spy(*args, **kwargs):
        program = original(*args, **kwargs)
        built.append(weakref.ref(program))
        return program

    monkeypatch.setattr(runtime, "build_program", spy)
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")  # measure both candidates
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)  # freed at once, without the collector
    enabled = gc.isenabled()  # (its frames closed, no cycle holds it)
    gc.disable()
    try:
        opt = pyrys.optimize(small_net(), (torch.rand(1, 3, 8, 8),), backend="dnnl", layout="auto", threads=1)
        alive = [ref() for ref in built if ref() is not None]
    finally:
        if enabled:
            gc.enable()
    assert len(built) == 2 and alive == [opt._first.program.first]


def test_a_graph_whose_convolutions_do_little_of_the_work_is_not_timed(monkeypatch):
    """A patch-embedding conv before big linears (ViT, Whisper): one program, channels-last, the share said."""
    from pyrys.backends.dnnl import runtime

    timed = []
    original = runtime._time_policies
    monkeypatch.setattr(runtime, "_time_policies", lambda *a, **k: timed.append(a) or original(*a, **k))
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    model = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.Flatten(2), nn.Linear(16, 512), nn.GELU(),
                          nn.Linear(512, 16)).eval()
    x = torch.rand(2, 3, 16, 16)
    opt = pyrys.optimize(model, (x,), backend="dnnl", layout="auto")
    assert timed == [] and opt._first.program.layout == "nhwc"
    assert "convolutions do 4.5% of the multiply-adds: not worth timing the layouts" in opt.program_text()
    assert (opt(x) - model(x)).abs().max() <= TOLERANCE * model(x).abs().max()
    pyrys.optimize(small_net(), (torch.rand(1, 3, 8, 8),), backend="dnnl", layout="auto")
    assert len(timed) == 1  # convolutions only: timed


def test_a_graph_without_convolution_is_built_once_whatever_the_layout_policy(monkeypatch):
    from pyrys.backends.dnnl import runtime

    built = []
    original = runtime.build_program
    monkeypatch.setattr(runtime, "build_program", lambda *a, **k: built.append(a[1]) or original(*a, **k))
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")  # nothing found in the cache: it would measure
    model, x = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4)).eval(), torch.rand(3, 16)
    opt = pyrys.optimize(model, (x,), backend="dnnl", layout="auto")
    assert len(built) == 1
    assert "no convolution: every layout policy gives this program" in opt.program_text()
    assert (opt(x) - model(x)).abs().max() <= TOLERANCE * model(x).abs().max()
    conv = pyrys.optimize(small_net(), (torch.rand(1, 3, 8, 8),), backend="dnnl", layout="auto")
    assert len(built) == 3 and "measured" in conv.program_text()  # a convolution: both candidates
