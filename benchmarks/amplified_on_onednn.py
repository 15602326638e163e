"""The bench's random EfficientNet-B0 in float32, its program trusted where its graph amplifies rounding (after)
and every call on torch ops as the self-check ran it before (``self_check.ROUNDED_ALIKE = 0``), beside ONNX
Runtime, interleaved blocks in one process, with each one's error against eager.

    python benchmarks/amplified_on_onednn.py
"""
from __future__ import annotations

import statistics
import warnings

import torch

import pyrys
import pyrys.bench.peers as peers
from pyrys.backends.dnnl import self_check
from pyrys.bench.models import build_model, example_inputs

from guarded_unguarded import block  # (this folder: run as python benchmarks/...)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model = build_model("efficientnet_b0").eval()
    inputs = example_inputs("efficientnet_b0", 1, model)
    reference = model(*inputs)
    after = pyrys.optimize(model, example_inputs=inputs)
    self_check.ROUNDED_ALIKE = 0.0  # the check before: a float32 program that differs runs on torch ops
    before = pyrys.optimize(model, example_inputs=inputs)
    ort = {p.name: p for p in peers.default_peers(2)}["onnxruntime"].prepare(model, inputs)
    runners = {"after (oneDNN)": after, "before (torch ops)": before, "onnxruntime": ort}
    times = {key: [] for key in runners}
    for _ in range(5):
        for key, runner in runners.items():
            times[key].append(block(runner, inputs))
    for key, runner in runners.items():
        y = runner(*inputs)
        y = torch.as_tensor(y[0] if isinstance(y, (list, tuple)) else y)
        print(f"{key:20s} {statistics.median(times[key]):7.2f} ms  error against eager "
              f"{pyrys.relative_error(y, reference):.1e}  blocks {[round(v, 1) for v in times[key]]}")
    print("backends:", after._first.backend, before._first.backend)


if __name__ == "__main__":
    main()
