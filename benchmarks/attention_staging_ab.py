"""One-head attention blocks writing a compact buffer (then one reorder) against writing the merge layout.

``lower_attention._staging_keeps_brgemm`` decides, per attention, whether bfloat16 blocks of one head write
a compact buffer, where oneDNN 3.2 gives the values matmul its brgemm kernel, instead of their part of the
output laid out for the heads' merge (its gemm kernel).  This builds the model both ways and times them in
one process, alternating; within ~5% of 1 is a tie.

    python benchmarks/attention_staging_ab.py --model hf_whisper_encoder --precision bf16
"""
from __future__ import annotations

import argparse
import statistics
import time

import pyrys
from pyrys.backends.dnnl import lower_attention
from pyrys.bench.models import build_model, example_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hf_whisper_encoder")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "int8"])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    model = build_model(args.model)
    inputs = example_inputs(args.model, 1, model)
    options = {"precision": args.precision, **({"calibration": [inputs]} if args.precision == "int8" else {})}
    decide, programs = lower_attention._staging_keeps_brgemm, {}
    for name, rule in (("compact buffer", decide), ("merge layout", lambda *_: False)):
        lower_attention._staging_keeps_brgemm = rule
        programs[name] = pyrys.optimize(model, inputs, **options)
        programs[name](*inputs)
    lower_attention._staging_keeps_brgemm = decide
    times = {name: [] for name in programs}
    for round_ in range(args.rounds):
        for name in (list(programs) if round_ % 2 == 0 else list(programs)[::-1]):
            start = time.perf_counter()
            programs[name](*inputs)
            programs[name](*inputs)
            times[name].append((time.perf_counter() - start) / 2 * 1e3)
    medians = {name: statistics.median(measured) for name, measured in times.items()}
    for name, median in medians.items():
        print(f"{name}: {median:.1f} ms, {median / medians['merge layout']:.3f} of the merge layout's")


if __name__ == "__main__":
    main()
