"""A conv net padded "same" (four 3x3 conv + BatchNorm + ReLU at 112 x 112): pyrys with simplify's
``explicit_conv_padding`` (after) and without it (before: each conv a torch fallback), against eager; one
process, interleaved, medians of rounds.

    python benchmarks/same_padding.py
"""
from __future__ import annotations

import statistics

import torch

import pyrys
from pyrys.bench.measure import interleaved_ms
import pyrys.passes.simplify as simplify

ROUNDS, SECONDS = 3, 1.0  # rounds of interleaved_ms, seconds timed a system a round


def same_padded_net() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for c_in, c_out in [(3, 32), (32, 64), (64, 64), (64, 128)]:
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding="same"), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


if __name__ == "__main__":
    model, x = same_padded_net(), torch.randn(1, 3, 112, 112)
    after = pyrys.optimize(model, (x,))
    rules = simplify.SIMPLIFY_RULES
    simplify.SIMPLIFY_RULES = tuple(rule for rule in rules if rule.name != "explicit_conv_padding")
    before = pyrys.optimize(model, (x,))
    simplify.SIMPLIFY_RULES = rules
    with torch.no_grad():
        times = interleaved_ms({"eager": (model, (x,)), "before": (before, (x,)), "after": (after, (x,))},
                               ROUNDS, SECONDS)
        errors = [pyrys.relative_error(opt(x), model(x)) for opt in (after, before)]
    ms = {label: statistics.median(values) for label, values in times.items()}
    print(", ".join(f"{label} {value:.2f} ms" for label, value in ms.items()),
          f"after/before {ms['after'] / ms['before']:.2f}; errors after/before {errors[0]:.1e}/{errors[1]:.1e}")
