"""Stress: one optimized module called from many threads at once must give every caller its own right answer.

Each check runs in a child process (``run_isolated``): a runtime that is not safe for
concurrent callers can crash (SIGSEGV, heap corruption), and that must fail the test, not pytest.
Every thread calls with its own distinct inputs, so a result mixed up with another call's is caught.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import pyrys
from tests.caller_helpers import (assert_all_right, caller_task, eager, images, optimize, residual_net, run_isolated,
                                  run_together, shared_between_calls)

THREADS = 8
CALLS = 40


def callers_of(opt, model, seed: int) -> list[Callable]:
    """A task per thread, each calling ``opt`` on its own inputs (seeds ``seed``, ``seed + 1``, ...)."""
    tasks = []
    for thread in range(THREADS):
        inputs = images(CALLS, seed=seed + thread)
        tasks.append(caller_task(opt, inputs, eager(model, inputs), thread))
    return tasks


def one_module_from_eight_threads(backend: str) -> None:
    model = residual_net()
    opt = optimize(model, tuple(images(1, seed=0)), backend)
    assert_all_right(run_together(callers_of(opt, model, 100)), THREADS * CALLS)


def test_one_module_called_from_eight_threads(backend):
    run_isolated(one_module_from_eight_threads, backend)


def thread_counts_switching_under_callers(backend: str) -> None:
    """The thread choice made to probe and switch at nearly every call (``pyrys.backends.thread_choice``):
    programs for fewer threads are built while others run, probes of one being built are cancelled, and
    every caller still gets its own right answer."""
    from pyrys.backends import thread_choice
    from pyrys.backends.threads import current_threads

    thread_choice.LOAD_SIGNAL, thread_choice.FIRST_INTERVAL, thread_choice.BELOW_CAP = 0.0, 1, 1
    thread_choice.PROBE_SHARE = 1e9
    model = residual_net()
    opt = optimize(model, tuple(images(1, seed=0)), backend)
    tasks = callers_of(opt, model, 150)
    threads = [0] * THREADS

    def counted(task: Callable, index: int) -> Callable:
        def run() -> list:
            threads[index] = current_threads()
            return task()
        return run

    assert_all_right(run_together([counted(task, i) for i, task in enumerate(tasks)]), THREADS * CALLS)
    if backend == "dnnl" and max(threads) >= 2:
        assert len(opt._first.program.programs) >= 2, "the calls never ran with fewer threads"


def test_thread_counts_switching_under_many_callers(backend):
    run_isolated(thread_counts_switching_under_callers, backend)


def two_modules_four_threads_each(backend: str) -> None:
    models = [residual_net(), residual_net(width=12, fallback="flip", view="narrow", seed=1)]
    x = images(1, seed=0)[0]
    opts = [optimize(models[0], (x,), backend, layout="nhwc"), optimize(models[1], (x,), backend)]
    tasks = []
    for thread in range(THREADS):
        which = thread % 2
        inputs = images(CALLS, seed=200 + thread)
        tasks.append(caller_task(opts[which], inputs, eager(models[which], inputs), thread))
    assert_all_right(run_together(tasks), THREADS * CALLS)


def test_two_modules_shared_by_four_threads_each(backend):
    run_isolated(two_modules_four_threads_each, backend)


def two_batch_sizes_at_once(backend: str) -> None:
    """Half the threads call with batch 2, never compiled before: the new program is built while others run."""
    model = residual_net(view="index")
    opt = optimize(model, tuple(images(1, seed=0)), backend, layout="nhwc")
    tasks = []
    for thread in range(THREADS):
        inputs = images(CALLS, seed=300 + thread, shape=(1 + thread % 2, 3, 32, 32))
        tasks.append(caller_task(opt, inputs, eager(model, inputs), thread))
    assert_all_right(run_together(tasks), THREADS * CALLS)


def calls_while_another_thread_captures(backend: str) -> None:
    """A new shape's capture (torch.export: a transformer at batch 1, which its symbolic graph excludes) on one
    thread while others call a shape built already: export sets torch.compiler.is_compiling() for the whole
    process, and their calls took the path for dynamo's trace, whose wrapper edits torch's node meta that
    export swaps (KeyError: 'custom'; a helper's find)."""
    import threading

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    opt = optimize(model, (torch.randn(2, 5, 16),), backend, dynamic=True)
    inputs = [torch.randn(2, 5, 16) for _ in range(4)]
    expected = eager(model, inputs)
    done = threading.Event()

    def hot(thread: int) -> Callable[[], list]:
        def task() -> list:
            wrong, calls = [], 0
            while not done.is_set() or calls == 0:
                wrong += caller_task(opt, inputs, expected, thread)()
                calls += 1
            return wrong
        return task

    def new_shape() -> list:
        try:
            x = torch.randn(1, 5, 16)
            error = pyrys.relative_error(opt(x), model(x))
            return [f"batch 1: relative error {error:.3g}"] if error > pyrys.FP32_TOLERANCE else []
        finally:
            done.set()

    results = run_together([hot(thread) for thread in range(3)] + [new_shape])
    assert_all_right(results, len(results))


def test_calls_while_another_thread_captures(backend):
    run_isolated(calls_while_another_thread_captures, backend)


def test_two_batch_sizes_called_at_once(backend):
    run_isolated(two_batch_sizes_at_once, backend)


def thread_settings_restored(backend: str) -> None:
    """``threads=1``: each caller's own ``torch.get_num_threads()`` is what it was before its calls."""
    model = residual_net()
    opt = optimize(model, tuple(images(1, seed=0)), backend, threads=1)
    torch.set_num_threads(3)
    main_before = torch.get_num_threads()

    def caller(thread: int) -> Callable[[], tuple]:
        inputs = images(CALLS, seed=400 + thread)
        calls = caller_task(opt, inputs, eager(model, inputs), thread)

        def task() -> tuple:
            torch.set_num_threads(1 + thread % 2)
            before = torch.get_num_threads()
            wrong = calls()
            return before, torch.get_num_threads(), wrong

        return task

    results = run_together([caller(thread) for thread in range(THREADS)])
    assert_all_right([wrong for _, _, wrong in results], THREADS * CALLS)
    changed = [f"thread {t}: {before} -> {after}" for t, (before, after, _) in enumerate(results) if before != after]
    assert not changed, f"calls with threads=1 changed their caller's torch.get_num_threads(): {changed}"
    main_after = torch.get_num_threads()
    assert main_after == main_before, f"the main thread's torch.get_num_threads() went {main_before} -> {main_after}"


def test_threads_option_restores_every_callers_setting(backend):
    run_isolated(thread_settings_restored, backend)


def outputs_belong_to_callers(backend: str) -> None:
    """Outputs held by callers are never shared with another call's, nor overwritten by later calls."""
    model = residual_net(view="index")
    opt = optimize(model, tuple(images(1, seed=0)), backend, layout="nhwc")
    calls = 21  # the first call, whose outputs are kept, then 20 more
    inputs = {thread: images(calls, seed=500 + thread) for thread in range(THREADS)}
    expected = {thread: eager(model, xs) for thread, xs in inputs.items()}

    def caller(thread: int) -> Callable[[], tuple[list, list]]:
        def task() -> tuple[list, list]:
            outputs, wrong = [], []
            for k, x in enumerate(inputs[thread]):
                outputs.append(opt(x))
                if pyrys.relative_error(outputs[-1], expected[thread][k]) > pyrys.FP32_TOLERANCE:
                    wrong.append(f"thread {thread} call {k}")
            return outputs, wrong

        return task

    results = run_together([caller(thread) for thread in range(THREADS)])
    assert_all_right([wrong for _, wrong in results], THREADS * calls)
    changed = [(thread, k) for thread, (outputs, _) in enumerate(results) for k, got in enumerate(outputs)
               if pyrys.relative_error(got, expected[thread][k]) > pyrys.FP32_TOLERANCE]
    first = [call for call in changed if call[1] == 0]
    assert not changed, (f"{len(changed)} of {THREADS * calls} outputs held by callers changed after later calls "
                         f"({len(first)} of the {THREADS} first calls'), e.g. (thread, call) {changed[:3]}")
    held = [((thread, k), tensor) for thread, (outputs, _) in enumerate(results) for k, output in enumerate(outputs)
            for tensor in output]
    shared = shared_between_calls(held)
    assert not shared, f"{len(shared)} pairs of outputs of different calls share memory, e.g. {shared[:3]}"


def test_outputs_belong_to_the_caller(backend):
    run_isolated(outputs_belong_to_callers, backend)


def fresh_thread_takes_the_process_setting() -> None:
    import threading

    from pyrys.backends.threads import current_threads

    torch.set_num_threads(1)
    model = residual_net()
    x = images(1, seed=0)[0]
    opt = optimize(model, (x,), "dnnl")
    seen = {}

    def worker() -> None:  # its first torch call is pyrys's
        seen["pyrys"] = current_threads()
        opt(x)
        seen["choice"] = opt.thread_choice()
        seen["torch"] = torch.get_num_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["pyrys"] == seen["torch"] == 1, seen
    assert seen["choice"].startswith("1 thread "), seen


@pytest.mark.skipif("dnnl" not in pyrys.available_backends(), reason="the dnnl backend is not available")
def test_a_new_thread_calls_with_the_count_torch_gives_it():
    """A new thread's OpenMP count is every CPU until torch gives it the process's setting at its first torch
    call: a worker thread of a process set to 1 thread ran 2 (a helper's find)."""
    run_isolated(fresh_thread_takes_the_process_setting)
