"""``pyrys demo``: the seed walkthrough, then a real model.

1. constant propagation on the seed's ``foo``;
2. Conv2d+BatchNorm2d+ReLU with constant propagation disabled, then enabled;
3. the same without freezing flags, and the reason BatchNorm was not folded;
4. a torchvision ResNet-18: node counts, numerical error, eager vs optimized latency.
"""
from __future__ import annotations

import time

import torch
from rich.console import Console

import pyrys
from pyrys.testing import randomize_batchnorm, torchvision_model

console = Console(highlight=False, markup=False, soft_wrap=True)


class Foo(torch.nn.Module):
    """The seed's ``foo`` with tensor constants (Python int arithmetic is folded while tracing)."""

    def forward(self, x):
        a = torch.full([1], 1.0) + 2
        b = a + 3
        c = b + 4
        return x + c


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


def part_constant_propagation() -> None:
    _heading("1. constant propagation")
    x = torch.rand(10)
    opt = pyrys.optimize(Foo().eval(), (x,))
    console.print("Plain int arithmetic (1 + 2 + 3 + 4) is already folded by torch.export while tracing;")
    console.print("arithmetic on tensor constants reaches the graph, and pyrys folds it.\n")
    console.print("Captured graph:\n" + opt.history[0].graph + "\n")
    console.print("After constant propagation:\n" + opt.graph)


def part_conv_bn_relu() -> None:
    _heading("2. Conv2d+BatchNorm2d+ReLU")
    model = randomize_batchnorm(ConvBnRelu()).eval()
    x = torch.rand(1, 3, 8, 8)
    for disable, label in ((("constant_propagation",), "disable constprop"), ((), "enable constprop")):
        opt = pyrys.optimize(model, (x,), disable=disable)
        console.print(f"// {label}\nConv2d+BatchNorm2d+Relu Graph:\n{opt.graph}\n")
    console.print(f"max relative error vs eager: {pyrys.relative_error(opt(x), model(x)):.2e}\n")


def part_unfrozen_flags() -> None:
    _heading("3. without freezing flags")
    model = randomize_batchnorm(ConvBnRelu()).eval()
    opt = pyrys.optimize(model, (torch.rand(1, 3, 8, 8),), freeze_flags=())
    console.print(f"Conv2d+BatchNorm2d+Relu Graph:\n{opt.graph}\n")
    for miss in opt.misses:
        console.print(f"not folded: {miss}")


def _median_ms(fn, x, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _count_ops(graph_text: str) -> int:
    return sum(1 for line in graph_text.splitlines() if " = " in line and "prim::" not in line)


def part_resnet18(iterations: int = 20) -> None:
    _heading("4. torchvision ResNet-18")
    model = torchvision_model("resnet18")
    x = torch.rand(1, 3, 224, 224)
    start = time.perf_counter()
    opt = pyrys.optimize(model, (x,))
    console.print(f"optimized in {time.perf_counter() - start:.1f} s (backend: {opt.backend})")
    console.print(f"ops: {_count_ops(opt.history[0].graph)} captured -> {_count_ops(opt.graph)} optimized")
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
    part_constant_propagation()
    part_conv_bn_relu()
    part_unfrozen_flags()
    part_resnet18()
    return 0
