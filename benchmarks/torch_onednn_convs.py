"""pyrys's bf16 convolutions (oneDNN 3.2, the ``onednn-cpu-gomp`` wheel) against torch's own oneDNN.

torch links a newer oneDNN (``torch.__config__.show()``: v3.12 in torch 2.14.1) that it does not export;
its convolution kernels are reachable as ``torch.ops.mkldnn._convolution_pointwise`` on a weight packed
once (``torch.ops.mkldnn._reorder_convolution_weight``), the path inductor's CPU backend takes.  For each
ResNet-50 convolution shape at batch 16, this times the convolution inside a pyrys program (a chain
``conv 1x1 -> relu -> conv -> relu -> conv 1x1``, so that it reads and writes bf16 channels-last as in a
network; ``program.profile``) and torch's kernel on the same bf16 channels-last input with the relu fused;
it prints each median and their ratio (torch / pyrys; within ~5% of 1 is a tie).

    python benchmarks/torch_onednn_convs.py --batch 16
"""
from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.nn as nn

import pyrys
from pyrys.bench.measure import time_block, warm_up

# (in channels, out channels, height and width, kernel, stride): ResNet-50's convolutions after the stem
SHAPES = [(64, 64, 56, 3, 1), (256, 64, 56, 1, 1), (64, 256, 56, 1, 1), (128, 128, 28, 3, 1),
          (512, 128, 28, 1, 1), (256, 256, 14, 3, 1), (1024, 256, 14, 1, 1), (512, 512, 14, 3, 2),
          (512, 512, 7, 3, 1), (512, 2048, 7, 1, 1)]


def pyrys_conv_seconds(conv: nn.Conv2d, x: torch.Tensor, runs: int) -> tuple[float, str]:
    """The middle convolution's median seconds in a bf16 pyrys program, and its program line."""
    chain = nn.Sequential(nn.Conv2d(conv.in_channels, conv.in_channels, 1), nn.ReLU(), conv, nn.ReLU(),
                          nn.Conv2d(conv.out_channels, 8, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pyrys.optimize(chain, (x,), precision="bf16")
    steps = [(text, us) for text, us in opt._first.program.profile([x], runs=runs) if "dnnl::conv" in text]
    text, us = steps[1]
    return us / 1e6, text


def torch_conv_seconds(conv: nn.Conv2d, x: torch.Tensor, runs: int) -> float:
    """Median seconds of torch's oneDNN convolution + relu on bf16 channels-last, the weight packed once
    (warmed for 0.25 s first)."""
    padding, stride = list(conv.padding), list(conv.stride)
    source = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach().to(torch.bfloat16), padding, stride,
                                                          [1, 1], 1, source.shape)
    bias = conv.bias.detach().to(torch.bfloat16)

    def call():
        return torch.ops.mkldnn._convolution_pointwise(source, weight, bias, padding, stride, [1, 1], 1, "relu", [], "")

    warm_up(call, (), 0.25)
    return statistics.median(time_block(call, (), runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; {[line.strip() for line in torch.__config__.show().splitlines() if 'DNN' in line][0]}")
    for cin, cout, size, kernel, stride in SHAPES:
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2).eval()
        x = torch.randn(args.batch, cin, size, size)
        ours, text = pyrys_conv_seconds(conv, x, args.runs)
        theirs = torch_conv_seconds(conv, x, args.runs)
        impl = text.split("impl=")[1].split("]")[0] if "impl=" in text else "?"
        print(f"{cin:5d} -> {cout:5d}, {size:3d}x{size:<3d} k{kernel} s{stride}: pyrys {ours * 1e6:7.0f} us ({impl}), "
              f"torch {theirs * 1e6:7.0f} us, torch / pyrys {theirs / ours:.2f}", flush=True)


if __name__ == "__main__":
    main()
