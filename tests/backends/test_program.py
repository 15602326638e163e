"""Every backend returns a :class:`pyrys.backends.program.Program`, and what ``memory()`` says adds up."""
import threading

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.backends.program import MEMORY_KEYS, Program
from pyrys.ir.released import is_released
from tests.caller_helpers import optimize
from tests.conftest import TOLERANCE


def small_conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return net.eval()


def state_bytes(model: nn.Module, kinds=(nn.Conv2d, nn.Linear)) -> int:
    """Bytes of the parameters and buffers of the modules of ``kinds`` (all modules: ``kinds=(nn.Module,)``)."""
    tensors = [t for m in model.modules() if isinstance(m, kinds) for t in [*m.parameters(False), *m.buffers(False)]]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("threads", [None, 1])
def test_every_backend_returns_a_program(backend, threads):
    model, x = small_conv_net(), torch.randn(1, 3, 16, 16)
    opt = optimize(model, (x,), backend, layout="nhwc", threads=threads)
    program = opt._first.program
    assert isinstance(program, Program)
    assert pyrys.relative_error(program([x])[0], model(x)) <= TOLERANCE
    assert program.describe()
    steps = program.profile([x], runs=2)
    assert len(steps) >= 3 and all(isinstance(text, str) and micros >= 0 for text, micros in steps)
    memory = opt.memory()
    assert list(memory) == list(MEMORY_KEYS) and all(isinstance(n, int) and n >= 0 for n in memory.values())


def test_weights_are_the_folded_parameters(backend):
    """BatchNorm folds into the conv before it: the graph keeps the conv and linear weights, not BN's; the dnnl
    program keeps the weights it packs only packed (their graph copies are released: ``ir/released.py``)."""
    model, x = small_conv_net(), torch.randn(1, 3, 16, 16)
    opt = optimize(model, (x,), backend, layout="nhwc")
    constants = list(opt._first.captured.gm.buffers())
    assert sum(t.numel() * t.element_size() for t in constants) == state_bytes(model)
    assert state_bytes(model) < state_bytes(model, (nn.Module,))
    held = sum(t.numel() * t.element_size() for t in constants if not is_released(t))
    assert opt.memory()["weights"] == held
    assert (held < state_bytes(model)) == (backend == "dnnl")


def test_the_reference_backend_holds_only_weights():
    model, x = small_conv_net(), torch.randn(1, 3, 16, 16)
    opt = pyrys.optimize(model, (x,), backend="reference")
    opt(x)
    assert opt.memory() == {"weights": state_bytes(model), "packed_weights": 0, "activations": 0, "frames": 0}


def test_dnnl_frames_grow_with_the_callers_running_at_once():
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend is unavailable")
    model, x = small_conv_net(), torch.randn(1, 3, 16, 16)
    # threads pinned: one program (a busy moment could otherwise add a program with fewer threads and its frames)
    opt = pyrys.optimize(model, (x,), backend="dnnl", layout="nhwc", threads=1)
    memory = opt.memory()  # the compile's check against the reference ran the program once: one frame
    assert memory["frames"] == memory["activations"]
    opt(x)
    memory = opt.memory()
    assert memory["packed_weights"] > 0 and memory["activations"] > 0
    assert memory["frames"] == memory["activations"]  # one caller: one frame
    for _ in range(20):  # four threads at once nearly always overlap; try again where they did not (a loaded
        call_from_threads(4, lambda: [opt(x) for _ in range(50)])  # host ran 5 tries of 20 calls apart once)
        if opt.memory()["frames"] > memory["activations"]:
            break
    frames = opt.memory()["frames"]
    assert frames > memory["activations"] and frames % memory["activations"] == 0


def call_from_threads(count: int, work) -> None:
    barrier = threading.Barrier(count)

    def run() -> None:
        barrier.wait()
        work()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
