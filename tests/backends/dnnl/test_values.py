"""What a dnnl program's values may share bytes with (``pyrys.backends.dnnl.values``)."""
from __future__ import annotations

from collections import Counter

import torch

import pyrys
from pyrys.backends.dnnl.values import DYNAMIC, Value


def test_the_roots_of_a_chain_that_borrows_twice_are_walked_once_each(monkeypatch):
    """Each torch step of ``atan2(x, x)`` borrows the one before twice: the roots were walked 2**n times (swin3d's
    compile never ended: 64 nested walks in the memory plan)."""
    chain = [Value("v0", None, kind=DYNAMIC)]
    for i in range(1, 20):
        chain.append(Value(f"v{i}", None, kind=DYNAMIC, borrows=[chain[-1], chain[-1]]))
    visits, root = Counter(), Value.root.fget
    monkeypatch.setattr(Value, "root", property(lambda value: visits.update([value.name]) or root(value)))
    assert sorted(value.name for value in chain[-1].roots()) == sorted(value.name for value in chain)
    assert max(visits.values()) <= 3, visits.most_common(1)


class TorchSteps(torch.nn.Module):
    def forward(self, x):
        for _ in range(40):
            x = torch.atan2(x, x)  # no oneDNN lowering: each a torch step reading the one before twice
        return torch.relu(x)


def test_a_long_chain_of_torch_steps_compiles():
    x = torch.rand(2, 8)
    opt = pyrys.optimize(TorchSteps().eval(), (x,), backend="dnnl")
    assert pyrys.relative_error(opt(x), TorchSteps()(x)) <= pyrys.FP32_TOLERANCE
