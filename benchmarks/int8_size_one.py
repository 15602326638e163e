"""int8 at a batch of one and a step of one token under ``dynamic=True``: GPT-2's symbolic graph excludes both,
and their captures fold constants at size 1, so the first plan's scales do not name their values.  After:
each such capture is calibrated on its own, on the samples the first compile kept cut to its size-1 dims;
before (the kept samples dropped, as until 2026-12-03): those shapes run their linears in floating point.
One process, interleaved, medians of rounds; errors against float32 eager on held-out inputs.

    python benchmarks/int8_size_one.py [--small] [--samples 16]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import pyrys
from pyrys.bench.measure import interleaved_ms
from pyrys.bench.transformer_models import MODELS
from pyrys.precision_notes import int8_layers
from pyrys.signature import signature_of

ROUNDS, SECONDS = 3, 1.0  # rounds of interleaved_ms, seconds timed a system a round
SHAPES = [(2, 64), (1, 1), (1, 64), (4, 1)]  # (batch, tokens): as calibrated, a decode step, a prompt of one, a step of four


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the 2-layer test config, not GPT-2 small")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples (batch 2 each)")
    args = parser.parse_args()
    model = MODELS["hf_gpt2"](small=args.small)
    tokens = model.example_inputs(2)[0].shape[1]
    draw = torch.Generator().manual_seed(0)
    vocab = model.model.config.vocab_size

    def ids(batch: int, length: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, vocab, (batch, length), generator=draw),)

    calibration = [ids(2, tokens) for _ in range(args.samples)]
    after = pyrys.optimize(model, ids(2, tokens), precision="int8", calibration=calibration, dynamic=True)
    before = pyrys.optimize(model, ids(2, tokens), precision="int8", calibration=calibration, dynamic=True)
    before._config.calibration.kept = []  # what every capture had before: the first plan, or float32
    for batch, length in SHAPES:
        inputs = ids(batch, min(length, tokens))
        with torch.no_grad():
            expected = model(*inputs)
            errors = {name: pyrys.relative_error(opt(*inputs), expected) for name, opt in
                      (("after", after), ("before", before))}
            times = interleaved_ms({"before": (before, inputs), "after": (after, inputs)}, ROUNDS, SECONDS)
        signature = signature_of(inputs, {})[0]
        layers = {name: int8_layers(opt._programs.get(signature).run) for name, opt in (("after", after), ("before", before))}
        ms = {name: statistics.median(values) for name, values in times.items()}
        print(f"{tuple(inputs[0].shape)}: before {ms['before']:.2f} ms ({layers['before']} int8 layers), after "
              f"{ms['after']:.2f} ms ({layers['after']}), after/before {ms['after'] / ms['before']:.2f}; "
              f"errors after/before {errors['after']:.1e}/{errors['before']:.1e}")


if __name__ == "__main__":
    main()
