"""Per-op cost of pre-created oneDNN primitives called through pyrys's binding.

A chain of 20 tiny convs (1x16x8x8, 3x3, pad 1, f32) runs as pre-bound
oneDNN primitives (`BoundCall.run`, one reorder in and one out) and,
interleaved in the same process, as the equivalent ONNX model in ONNX
Runtime. Each side is warmed for >= 0.25 s before it is timed (ORT's
spinning threads otherwise slow whatever runs next). Reported: median time per inference / 20. The dnnl
activation layout is chosen at build time by timing each candidate chain
(format_tag_any, nChw16c, nChw8c), as the lowering is meant to.

Run: PYTHONPATH=src python benchmarks/dnnl_overhead.py
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from pyrys.backends.dnnl import binding
from pyrys.backends.dnnl.constants import ARG_BIAS, ARG_DST, ARG_FROM, ARG_SRC, ARG_TO, ARG_WEIGHTS, DataType, FormatTag
from pyrys.backends.dnnl.descriptors import convolution_pd, reorder_pd
from pyrys.backends.dnnl.primitives import Engine, Memory, MemoryDesc, Primitive, PrimitiveDesc, Stream
from pyrys.backends.dnnl.tensors import empty_memory, tensor_memory, to_layout

DEPTH = 20
SHAPE = (1, 16, 8, 8)
ROUNDS = 7
REPS = 300
WARMUP_S = 0.25
LAYOUTS = (FormatTag.any, FormatTag.nChw16c, FormatTag.nChw8c)  # any: oneDNN proposes


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(DEPTH)]).eval()


class DnnlChain:
    """The model as a flat list of pre-bound oneDNN calls."""

    def __init__(self, model: nn.Sequential, x: torch.Tensor, out: torch.Tensor, tag: FormatTag) -> None:
        self.engine = Engine()
        self.stream = Stream(self.engine)
        any_md = MemoryDesc.from_tag(SHAPE, DataType.f32, tag)
        weights_any = MemoryDesc.from_tag((16, 16, 3, 3), DataType.f32, FormatTag.any)
        bias_md = MemoryDesc.from_tag((16,), DataType.f32, FormatTag.a)
        self.pds = [convolution_pd(self.engine, any_md, weights_any, any_md, bias_md, strides=(1, 1),
                                     padding_l=(1, 1)) for _ in model]  # fmt: skip
        act_md = self.pds[0].dst_md()
        self.input = tensor_memory(self.engine, x)
        buffers = [empty_memory(self.engine, act_md) for _ in range(2)]
        self.keep = []  # weights, biases, primitives
        self.runs = [self._reorder(self.input, buffers[0])]
        for i, (conv, pd) in enumerate(zip(model, self.pds)):
            self.runs.append(self._conv(conv, pd, buffers[i % 2], buffers[(i + 1) % 2]))
        self.runs.append(self._reorder(buffers[DEPTH % 2], tensor_memory(self.engine, out)))

    def _reorder(self, src: Memory, dst: Memory):
        primitive = Primitive(reorder_pd(self.engine, src.md, dst.md))
        self.keep.append(primitive)
        return primitive.bind(self.stream, {ARG_FROM: src, ARG_TO: dst}).run

    def _conv(self, conv: nn.Conv2d, pd: PrimitiveDesc, src: Memory, dst: Memory):
        weights = to_layout(self.engine, self.stream, conv.weight.detach(), pd.weights_md())
        bias = tensor_memory(self.engine, conv.bias.detach().contiguous())
        primitive = Primitive(pd)
        self.keep += [weights, bias, primitive]
        args = {ARG_SRC: src, ARG_WEIGHTS: weights, ARG_BIAS: bias, ARG_DST: dst}
        return primitive.bind(self.stream, args).run

    def __call__(self, x_ptr: int) -> None:
        self.input.set_handle(x_ptr)
        for run in self.runs:
            run()


def pick_chain(model: nn.Sequential, x: torch.Tensor, out: torch.Tensor) -> tuple[DnnlChain, dict]:
    """Build the chain in each candidate layout; keep the fastest (compile-time choice)."""
    x_ptr = x.data_ptr()
    chains = {tag.name: DnnlChain(model, x, out, tag) for tag in LAYOUTS}
    quick = {name: statistics.median(time_side(lambda: c(x_ptr), 200)) / DEPTH * 1e6 for name, c in chains.items()}
    return chains[min(quick, key=quick.get)], quick


def onnx_session(model: nn.Sequential, x: torch.Tensor) -> ort.InferenceSession:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def time_side(step, reps: int) -> list[float]:
    """Warm for WARMUP_S, then time `reps` single inferences (seconds each)."""
    end = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end:
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        step()
        times.append((time.perf_counter_ns() - start) * 1e-9)
    return times


def main() -> None:
    ok, why = binding.is_available()
    if not ok:
        raise SystemExit(f"oneDNN unavailable: {why}")
    model = build_model()
    x = torch.randn(SHAPE)
    out = torch.empty(SHAPE)
    chain, quick = pick_chain(model, x, out)
    session = onnx_session(model, x)
    x_np = x.numpy()
    with torch.no_grad():
        ref = model(x)
    chain(x.data_ptr())
    ort_out = session.run(None, {"x": x_np})[0]

    x_ptr = x.data_ptr()
    sides = {"pyrys dnnl": lambda: chain(x_ptr), "onnxruntime": lambda: session.run(None, {"x": x_np})}
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(ROUNDS):
        for name, step in sides.items():
            samples[name] += time_side(step, REPS)

    per_op = {name: statistics.median(ts) / DEPTH * 1e6 for name, ts in samples.items()}
    pd = chain.pds[0]
    print(f"cpu: {cpu_model()}")
    print(f"threads: {torch.get_num_threads()} (torch.get_num_threads; ORT intra_op_num_threads the same)")
    print(f"oneDNN {binding.version()}, onnxruntime {ort.__version__}, torch {torch.__version__}")
    print(f"conv impl: {pd.impl_info()}; src {pd.src_md().format_summary()}, weights {pd.weights_md().format_summary()}")
    print("layout candidates (quick, us/op): " + ", ".join(f"{k} {v:.2f}" for k, v in quick.items()))
    print(f"chain: {DEPTH} x Conv2d(16,16,3,padding=1) on {SHAPE}; pyrys adds 1 reorder in + 1 out")
    print(f"samples: {ROUNDS} interleaved rounds x {REPS} inferences per side, median")
    print(f"max abs err vs torch: pyrys {(out - ref).abs().max().item():.2e}, "
          f"ort {np.abs(ort_out - ref.numpy()).max():.2e}")  # fmt: skip
    for name, value in per_op.items():
        print(f"{name:12s}: {value:7.2f} us/op  ({value * DEPTH:8.1f} us/inference)")
    print(f"ratio pyrys / ort: {per_op['pyrys dnnl'] / per_op['onnxruntime']:.2f}")


if __name__ == "__main__":
    main()
