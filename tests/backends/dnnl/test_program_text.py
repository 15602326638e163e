"""The dnnl program's text reads as a program: every value a line reads is the header's, or a line's before it
(a step's, or a ``view`` line: another value's bytes seen with another shape, which is no call)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import pyrys

pytestmark = pytest.mark.skipif("dnnl" not in pyrys.available_backends(), reason="the oneDNN runtime does not load here")

_DEFINED = re.compile(r"%([\w.\[\]:, ]+?) : ")
_OPERANDS = re.compile(r"\(([^()]*)\)\s*$")


def undefined_reads(text: str) -> list[tuple[str, str]]:
    """Each ``(name, line)`` where a line reads a value no line before it defines."""
    header, *lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    defined, missing = set(_DEFINED.findall(header)), []
    for line in lines:
        operands = _OPERANDS.search(line.split("  #")[0])
        for name in re.findall(r"%([\w.]+(?:\[[^\]]*\])?)", operands.group(1) if operands else ""):
            if name not in defined:
                missing.append((name, line.strip()))
        if defined_here := re.match(r"\s*%([\w.]+(?:\[[^\]]*\])?) : ", line):
            defined.add(defined_here.group(1))
    return missing


class Block(nn.Module):
    """Attention (its scores and probabilities are values of their own) and a mean over the tokens."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _pooled_head():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


class MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class TorchReaders(nn.Module):
    """torch ops (no oneDNN lowering) reading a conv's and a linear's results: in bf16 both write the float32
    their readers convert to, the conversion folded into them."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(16, 10)

    def forward(self, x):
        pooled = nn.functional.adaptive_max_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        logits = self.fc(pooled)
        return logits, logits.argmax(-1)


@pytest.mark.parametrize("options", [{"layout": "nhwc"}, {"layout": "blocked16"}, {"precision": "bf16"},
                                     {"precision": "int8"}], ids=lambda o: next(iter(o.values())))
@pytest.mark.parametrize("build, shape", [(MeanHead, (1, 3, 8, 8)), (_pooled_head, (2, 3, 8, 8)), (Block, (2, 7, 32)),
                                          (TorchReaders, (2, 3, 12, 12))],
                         ids=["mean", "flatten", "attention", "torch-readers"])
def test_every_value_a_program_line_reads_is_defined_before_it(build, shape, options):
    """A mean without keepdim in blocked16 printed ``%mean = pooling(...)``, then a reorder of ``%mean.keepdim``
    (never defined) and a linear reading ``%mean`` (the pooling's name, not the reorder's view); a flatten was
    read and never defined; attention's softmax line had no type; in bf16 a torch op read ``%conv2d_f32``, the
    name of a conversion folded into the conv (helpers' finds)."""
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(shape)
    if options.get("precision") == "int8":
        options = {**options, "calibration": [torch.randn(shape) for _ in range(4)]}
    opt = pyrys.optimize(model, (x,), backend="dnnl", **options)
    text = opt.program_text()
    assert undefined_reads(text) == [], text
    assert pyrys.relative_error(opt(x), model(x)) <= {"bf16": 3e-2, "int8": 5e-2}.get(options.get("precision"), 1e-4)


def test_a_bf16_op_writing_float32_is_typed_so():
    """A bf16 conv or linear whose float32 conversion is folded into it (``dst_dtype=f32``) writes float32, and
    its line says so (it said ``BFloat16``)."""
    torch.manual_seed(0)
    opt = pyrys.optimize(TorchReaders().eval(), (torch.randn(2, 3, 12, 12),), backend="dnnl", precision="bf16")
    if "bf16" not in opt.program_text():
        pytest.skip("no native bf16 on this CPU: the program runs float32")
    folded = [line for line in opt.program_text().splitlines() if "dst_dtype=f32" in line]
    assert len(folded) == 2, opt.program_text()
    assert all(re.match(r"\s*%\w+ : Float\(", line) for line in folded), opt.program_text()
