"""What this machine can do at best, and what each model needs.

Peaks are the best of a few runs of one large kernel through torch (oneDNN / MKL):
an fp32 3x3 conv (1x256x56x56 -> 256, NCHW and channels-last) and an fp32 2048^3
matmul; bf16 ones too where the CPU supports bf16. They are torch's best, not the
hardware's: another library's kernels (ORT's MLAS, OpenVINO) can beat them, so
"% of peak" above 100 is possible. On a shared machine they are noisy too. A model's FLOPs are counted on one forward with
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs), so
achieved GFLOP/s = FLOPs / median latency.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pyrys.bench.peers import Inputs


def count_flops(model: nn.Module, inputs: Inputs) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return int(counter.get_total_flops())


def best_seconds(kernel: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one warm-up call."""
    kernel()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kernel()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(size: int, dtype: torch.dtype, repeats: int) -> float:
    """Best GFLOP/s of a ``size``^3 matmul."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def conv_gflops(channels: int, pixels: int, dtype: torch.dtype, repeats: int,
                memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Best GFLOP/s of a 3x3 ``channels``->``channels`` conv on a ``pixels``^2 image."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype).eval()
    conv = conv.to(memory_format=memory_format)
    x = torch.randn(1, channels, pixels, pixels, dtype=dtype).to(memory_format=memory_format)
    flops = 2 * channels * channels * 9 * pixels * pixels
    with torch.no_grad():
        return flops / best_seconds(lambda: conv(x), repeats) / 1e9


def best_conv_gflops(channels: int, pixels: int, dtype: torch.dtype, repeats: int) -> float:
    """The better of NCHW and channels-last (oneDNN picks different kernels for each)."""
    formats = (torch.contiguous_format, torch.channels_last)
    return max(conv_gflops(channels, pixels, dtype, repeats, layout) for layout in formats)


def has_bf16() -> bool:
    """Whether torch's oneDNN has native bf16 kernels on this CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def measure_peaks(quick: bool = False) -> dict[str, float]:
    """Best GFLOP/s per kernel, e.g. ``{"fp32 conv3x3": 140.2, "fp32 matmul": 151.0}``."""
    size, channels, pixels, repeats = (512, 64, 28, 2) if quick else (2048, 256, 56, 5)
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if has_bf16() else {})}
    peaks = {}
    for label, dtype in dtypes.items():
        peaks[f"{label} conv3x3"] = best_conv_gflops(channels, pixels, dtype, repeats)
        peaks[f"{label} matmul"] = matmul_gflops(size, dtype, repeats)
    return peaks


def best_of(*measurements: dict[str, float]) -> dict[str, float]:
    """Per kernel, the best of several ``measure_peaks`` results (noise only slows kernels)."""
    return {key: max(m[key] for m in measurements) for key in measurements[0]}


def fp32_peak(peaks: dict[str, float]) -> float | None:
    """The best fp32 GFLOP/s among the measured kernels."""
    fp32 = [value for key, value in peaks.items() if key.startswith("fp32")]
    return max(fp32) if fp32 else None
