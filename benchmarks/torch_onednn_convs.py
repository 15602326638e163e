"""pyrys's bf16 convolutions (oneDNN 3.2, the ``onednn-cpu-gomp`` wheel) against torch's own oneDNN.

torch links a newer oneDNN (``torch.__config__.show()``: v3.12 in torch 2.14.1) that it does not export;
its convolution kernels are reachable as ``torch.ops.mkldnn._convolution_pointwise`` on a weight packed
once (``torch.ops.mkldnn._reorder_convolution_weight``), the path inductor's CPU backend takes.  For each
ResNet-50 convolution shape, this builds the convolution inside a pyrys program (a chain ``conv 1x1 -> relu
-> conv -> relu -> conv 1x1``, so that it reads and writes bf16 channels-last as in a network) and times
three things, interleaved in rounds: pyrys's step inside its program (``program.profile``), pyrys's
primitive alone on buffers of random bf16 values, and torch's kernel with the relu fused on the same bf16
channels-last input (it allocates its output every call, which a program would not).  It prints each
median and the ratio torch / pyrys-alone (within ~5% of 1 is a tie).

    python benchmarks/torch_onednn_convs.py --batch 16
"""
from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.nn as nn

import pyrys
from pyrys.backends.dnnl.constants import ARG_SCRATCHPAD
from pyrys.backends.dnnl.primitives import Memory, Stream
from pyrys.bench.measure import time_block, warm_up

# (in channels, out channels, height and width, kernel, stride): ResNet-50's convolutions after the stem
SHAPES = [(64, 64, 56, 3, 1), (256, 64, 56, 1, 1), (64, 256, 56, 1, 1), (128, 128, 28, 3, 1),
          (512, 128, 28, 1, 1), (256, 256, 14, 3, 1), (1024, 256, 14, 1, 1), (512, 512, 14, 3, 2),
          (512, 512, 7, 3, 1), (512, 2048, 7, 1, 1)]


def pyrys_program(conv: nn.Conv2d, x: torch.Tensor):
    """The bf16 program of a chain around ``conv``, and the index of ``conv``'s step in it."""
    chain = nn.Sequential(nn.Conv2d(conv.in_channels, conv.in_channels, 1), nn.ReLU(), conv, nn.ReLU(),
                          nn.Conv2d(conv.out_channels, 8, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = pyrys.optimize(chain, (x,), precision="bf16")._first.program.first
    return program, [i for i, step in enumerate(program.steps) if "dnnl::conv" in step.text][1]


def torch_conv_call(conv: nn.Conv2d, x: torch.Tensor):
    """torch's oneDNN convolution + relu on bf16 channels-last, the weight packed once."""
    padding, stride = list(conv.padding), list(conv.stride)
    source = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach().to(torch.bfloat16), padding, stride,
                                                          [1, 1], 1, source.shape)
    bias = conv.bias.detach().to(torch.bfloat16)
    return lambda: torch.ops.mkldnn._convolution_pointwise(source, weight, bias, padding, stride, [1, 1], 1, "relu",
                                                           [], "")


def primitive_alone_call(program, step):
    """``step``'s primitive run alone on buffers of random bf16 values (and its own scratchpad)."""
    primitive, mds = step.primitive
    keep = []

    def memory(md):
        data = torch.randn(max(md.size() // 2, 1)).to(torch.bfloat16)
        keep.append(data)
        return Memory(program.engine, md, data.data_ptr())

    memories = {arg: memory(md) for arg, md in mds.items()}
    scratchpad = primitive.pd.scratchpad_md()
    if scratchpad.size():
        memories[ARG_SCRATCHPAD] = memory(scratchpad)
    bound = primitive.bind(Stream(program.engine), memories)  # holds its memories; their bytes live in keep

    def run() -> None:
        bound.run()

    run.keep = keep
    return run


def median_seconds(call, seconds: float, runs: int) -> list[float]:
    warm_up(call, (), seconds)
    return time_block(call, (), runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; {[line.strip() for line in torch.__config__.show().splitlines() if 'DNN' in line][0]}")
    for cin, cout, size, kernel, stride in SHAPES:
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2).eval()
        x = torch.randn(args.batch, cin, size, size)
        program, index = pyrys_program(conv, x)
        alone, theirs = primitive_alone_call(program, program.steps[index]), torch_conv_call(conv, x)
        times = {"in program": [], "alone": [], "torch": []}
        for _ in range(args.rounds):
            times["in program"] += [program.profile([x], runs=args.runs)[index][1] / 1e6]
            times["alone"] += median_seconds(alone, 0.1, args.runs)
            times["torch"] += median_seconds(theirs, 0.1, args.runs)
        ms = {name: statistics.median(values) * 1e6 for name, values in times.items()}
        text = program.steps[index].text
        impl = text.split("impl=")[1].split("]")[0] if "impl=" in text else "?"
        print(f"{cin:5d} -> {cout:5d}, {size:3d}x{size:<3d} k{kernel} s{stride}: pyrys in its program {ms['in program']:7.0f} "
              f"us, alone {ms['alone']:7.0f} us ({impl}); torch {ms['torch']:7.0f} us; torch / pyrys alone "
              f"{ms['torch'] / ms['alone']:.2f}", flush=True)


if __name__ == "__main__":
    main()
