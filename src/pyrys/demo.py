"""``pyrys demo``: the seed walkthrough, then a real model.

1. constant propagation on the seed's ``foo``, scripted (TorchScript in);
2. the seed's scripted Conv2d+BatchNorm2d+ReLU with its ``_jit_pass_freeze_*`` calls,
   constant propagation disabled, then enabled, then the dnnl program;
3. the same without freezing flags, and the reason BatchNorm was not folded;
4. a torchvision ResNet-18: node counts, numerical error, eager vs optimized latency.
"""
from __future__ import annotations

import time
import warnings

import torch
from rich.console import Console

import pyrys
from pyrys.testing import randomize_batchnorm, torchvision_model
from pyrys.zoo import count_ops

console = Console(highlight=False, markup=False, soft_wrap=True)


class Foo(torch.nn.Module):
    """The seed's ``foo`` with tensor constants (Python int arithmetic is folded while tracing): :func:`tensor_foo`."""

    def forward(self, x):
        return tensor_foo(x)


class ConvBnRelu(torch.nn.Module):
    """The seed's ``ScriptedConv2dBnRelu(3, 32, kernel_size=3, stride=1)``."""

    def __init__(self, in_channels: int = 3, out_channels: int = 32, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def ScriptedConv2dBnRelu(in_channels: int = 3, out_channels: int = 32, kernel_size: int = 3,
                         stride: int = 1) -> torch.jit.ScriptModule:
    """The seed's scripted module: ``torch.jit.script`` of :class:`ConvBnRelu` (eval mode, BN statistics randomized)."""
    model = randomize_batchnorm(ConvBnRelu(in_channels, out_channels, kernel_size, stride)).eval()
    return torch.jit.script(model)


def _heading(text: str) -> None:
    console.rule(text)


def foo(x):
    """The seed's ``foo``: TorchScript folds this int arithmetic itself while scripting."""
    a = 1 + 2
    b = a + 3
    c = b + 4
    return x + c


def tensor_foo(x):
    """The seed's ``foo`` on a tensor constant: TorchScript keeps the chain, pyrys folds it."""
    a = torch.full([1], 1.0) + 2
    b = a + 3
    c = b + 4
    return x + c


def part_constant_propagation() -> None:
    _heading("1. constant propagation (TorchScript in)")
    console.print("torch.jit.script(foo).graph: TorchScript already folded 1 + 2 + 3 + 4 while scripting:\n")
    console.print(str(torch.jit.script(foo).graph))
    console.print("Arithmetic on a tensor constant reaches the graph; pyrys imports it without tracing:\n")
    opt = pyrys.optimize(torch.jit.script(tensor_foo), (torch.rand(10),))
    console.print("Imported graph:\n" + opt.history[0].graph + "\n")
    console.print("After constant propagation:\n" + opt.graph)


def _seed_module() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return ScriptedConv2dBnRelu(3, 32, kernel_size=3, stride=1)


def part_conv_bn_relu() -> None:
    _heading("2. Conv2d+BatchNorm2d+ReLU, the seed's calls")
    m = _seed_module()
    for name in ("weight", "bias", "running_mean", "running_var"):
        pyrys._jit_pass_freeze_params(m._c, "forward", name)
    pyrys._jit_pass_freeze_flags(m._c, "forward", "training", False)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        for disable, label in ((("constant_propagation",), "disable constprop"), ((), "enable constprop")):
            graph = pyrys.jit.graph_for(m, x, backend="reference", disable=disable)
            console.print(f"// {label}\nConv2d+BatchNorm2d+Relu Graph:\n{graph}\n")
        program = pyrys.jit.compile(m, x)
        if program.backend == "dnnl":
            console.print(f"// the dnnl program\n{pyrys.jit.graph_for(m, x)}\n")
        error = pyrys.relative_error(pyrys.jit.run(m, x), m(x))
    console.print(f"max relative error vs TorchScript: {error:.2e}\n")


def part_unfrozen_flags() -> None:
    _heading("3. without _jit_pass_freeze_flags")
    m = _seed_module()
    pyrys.jit.freeze_params(m, "weight", "bias", "running_mean", "running_var")
    x = torch.rand(1, 3, 8, 8)
    compiled = pyrys.jit.compile(m, x, backend="reference")
    console.print(f"Conv2d+BatchNorm2d+Relu Graph:\n{compiled.graph}\n")
    for miss in compiled.misses:
        console.print(f"not folded: {miss}")


def _median_ms(fn, x, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def part_resnet18(iterations: int = 20) -> None:
    _heading("4. torchvision ResNet-18")
    model = torchvision_model("resnet18")
    x = torch.rand(1, 3, 224, 224)
    start = time.perf_counter()
    opt = pyrys.optimize(model, (x,))
    console.print(f"optimized in {time.perf_counter() - start:.1f} s (backend: {opt.backend})")
    console.print(f"ops: {count_ops(opt.history[0].graph)} captured -> {count_ops(opt.graph)} optimized")
    console.print(opt.report())
    with torch.no_grad():
        console.print(f"max relative error vs eager: {pyrys.relative_error(opt(x), model(x)):.2e} "
                      f"(tolerance {pyrys.FP32_TOLERANCE:g})")
        for fn in (model, opt):
            fn(x)  # warm up
        eager, optimized = _median_ms(model, x, iterations), _median_ms(opt, x, iterations)
    console.print(f"latency (median of {iterations}, {torch.get_num_threads()} threads): "
                  f"eager {eager:.2f} ms, pyrys {optimized:.2f} ms ({eager / optimized:.2f}x)")


def run_demo() -> int:
    warnings.filterwarnings("ignore", message=".*torch.jit.*is deprecated", category=FutureWarning)
    part_constant_propagation()
    part_conv_bn_relu()
    part_unfrozen_flags()
    part_resnet18()
    return 0
