"""int8 against float32 depthwise convolutions, oneDNN's primitives alone, in each activation layout.

Each row times one convolution of MobileNetV3-Large's depthwise shapes (batch 1) as oneDNN builds it for
u8 source and s8 weights (scales at execution) and for float32, in channels-last and in 8-channel blocks,
on buffers of constant bytes, interleaved (``measured.best_seconds``: the best of ``--rounds`` calls).

    python benchmarks/int8_depthwise.py --threads 2
"""
from __future__ import annotations

import argparse

import torch

from pyrys.backends.dnnl.constants import ARG_ATTR_SCALES, ARG_DST, ARG_SRC, ARG_WEIGHTS
from pyrys.backends.dnnl.descriptors import convolution_pd
from pyrys.backends.dnnl.layout import any_md, plain_md, policy_md
from pyrys.backends.dnnl.measured import best_seconds, filled_memory
from pyrys.backends.dnnl.primitives import Engine, Primitive, PrimitiveAttr, Stream

SHAPES = [(64, 112, 3, 2), (72, 56, 3, 1), (120, 28, 5, 1), (240, 28, 3, 2), (480, 14, 3, 1), (672, 14, 5, 2),
          (960, 7, 5, 1)]  # channels, size, kernel, stride
KINDS = [(layout, dtype) for layout in ("nhwc", "blocked8") for dtype in (torch.uint8, torch.float32)]


def _call(engine: Engine, stream: Stream, channels: int, size: int, kernel: int, stride: int, layout: str,
          dtype: torch.dtype):
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    int8 = dtype == torch.uint8
    attr = PrimitiveAttr(scales={ARG_SRC: 0, ARG_WEIGHTS: 0b11, ARG_DST: 0}) if int8 else PrimitiveAttr()
    pd = convolution_pd(engine, policy_md([1, channels, size, size], dtype, layout),
                        any_md([channels, 1, 1, kernel, kernel], torch.int8 if int8 else torch.float32),
                        policy_md([1, channels, out, out], dtype, layout), None, strides=[stride] * 2,
                        padding_l=[kernel // 2] * 2, padding_r=[kernel // 2] * 2, dilation=[1, 1], attr=attr)
    args = {arg: filled_memory(engine, md) for arg, md in
            ((ARG_SRC, pd.src_md()), (ARG_WEIGHTS, pd.weights_md()), (ARG_DST, pd.dst_md()))}
    if int8:
        for arg, count in ((ARG_SRC, 1), (ARG_WEIGHTS, channels), (ARG_DST, 1)):
            args[ARG_ATTR_SCALES | arg] = filled_memory(engine, plain_md([count], torch.float32))
    return pd.impl_info(), Primitive(pd).bind(stream, args).run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine()
    stream = Stream(engine)
    print("| channels, size, kernel, stride | " + " | ".join(f"{'int8' if d == torch.uint8 else 'float32'} {layout} us"
                                                               for layout, d in KINDS) + " |")
    print("| --- |" + " ---: |" * len(KINDS))
    for shape in SHAPES:
        made = [_call(engine, stream, *shape, layout, dtype) for layout, dtype in KINDS]
        seconds = best_seconds([run for _, run in made], args.rounds)
        cells = [f"{s * 1e6:.0f} (`{impl}`)" for (impl, _), s in zip(made, seconds)]
        print(f"| {', '.join(map(str, shape))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
