"""Attention in blocks of queries against all at once, in one process, interleaved.

The dnnl backend runs attention a block of queries at a time when its scores pass
``pyrys.backends.dnnl.lower_attention.SCORES_BLOCK_BYTES``.  This builds one program per budget (the
first, huge, is one block) and times them in alternating order; it prints each median and its ratio to
the first.  Within ~5% of 1 is a tie.

    python benchmarks/attention_blocks_ab.py --model hf_whisper_encoder --budgets-mb 1000 2 4 8 16 32
    python benchmarks/attention_blocks_ab.py --precision bf16 --budgets-mb 1000 0.5 1 2 4 8
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
    parser.add_argument("--budgets-mb", type=float, nargs="+", default=[1000, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    model = build_model(args.model)
    inputs = example_inputs(args.model, 1, model)
    programs = {}
    for budget in args.budgets_mb:
        lower_attention.SCORES_BLOCK_BYTES = int(budget * (1 << 20))
        programs[budget] = pyrys.optimize(model, inputs, layout="nhwc", precision=args.precision)
        programs[budget](*inputs)
    times = {budget: [] for budget in programs}
    for round_ in range(args.rounds):
        order = list(programs) if round_ % 2 == 0 else list(programs)[::-1]
        for budget in order:
            start = time.perf_counter()
            programs[budget](*inputs)
            programs[budget](*inputs)
            times[budget].append((time.perf_counter() - start) / 2 * 1e3)
    first = statistics.median(times[args.budgets_mb[0]])
    for budget, measured in times.items():
        median = statistics.median(measured)
        print(f"{budget:g} MB: {median:.1f} ms, {median / first:.3f} of one block")


if __name__ == "__main__":
    main()
