"""Convolutions padded TF-style ("same" with a stride: a zero pad, often one more at the end, then a conv
without padding; what ports of TensorFlow models such as timm's ``tf_`` EfficientNets do): legalize's
``zero_pad_into_conv`` folds each pad into its conv's padding, begin and end per dim (after), against the
pads run as torch steps (before, the rule off) and the same torchvision net with its own symmetric padding
(the cost without pads); one process, interleaved, medians of rounds, batch 1.

    python benchmarks/zero_pads.py [--precision bf16] [--models mobilenet_v2 efficientnet_b0]
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import pyrys
import pyrys.passes.legalize as legalize
from pyrys.bench.measure import interleaved_ms

ROUNDS, SECONDS = 3, 1.0  # rounds of interleaved_ms, seconds timed a system a round


class TFSamePadded(nn.Module):
    """``conv`` without its padding, after a zero pad of TensorFlow's "same": ``total = max((ceil(n / s) - 1) * s
    + (k - 1) * d + 1 - n, 0)`` per dim, ``total // 2`` at the start and the rest at the end."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = copy.deepcopy(conv)
        self.conv.padding = (0, 0)

    def forward(self, x):
        pads = []
        for n, k, s, d in reversed(list(zip(x.shape[2:], self.conv.kernel_size, self.conv.stride, self.conv.dilation))):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return self.conv(F.pad(x, pads))


def tf_padded(model: nn.Module) -> nn.Module:
    """``model`` with every strided conv (kernel > 1) padded TF-style."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and max(child.kernel_size) > 1:
                setattr(module, child_name, TFSamePadded(child))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    for name in args.models:
        original = getattr(torchvision.models, name)().eval()
        model = tf_padded(original)
        after = pyrys.optimize(model, (x,), precision=args.precision)
        rules, legalize.PADDING_RULES = legalize.PADDING_RULES, ()
        before = pyrys.optimize(model, (x,), precision=args.precision)
        legalize.PADDING_RULES = rules
        own = pyrys.optimize(original, (x,), precision=args.precision)
        with torch.no_grad():
            times = interleaved_ms({"before": (before, (x,)), "after": (after, (x,)), "own padding": (own, (x,))},
                                   ROUNDS, SECONDS)
            errors = [pyrys.relative_error(opt(x), model(x)) for opt in (after, before)]
        ms = {label: statistics.median(values) for label, values in times.items()}
        pads = sum(line.count("torch::pad") for line in before.program_text().splitlines())
        print(f"{name} ({args.precision}, {pads} pads): " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
              f"after/before {ms['after'] / ms['before']:.2f}, after/own padding {ms['after'] / ms['own padding']:.2f};",
              f"errors after/before {errors[0]:.1e}/{errors[1]:.1e}")


if __name__ == "__main__":
    main()
