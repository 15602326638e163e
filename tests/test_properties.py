"""Property: any small conv net built from the fusable layers optimizes to the same function.

Hypothesis draws a stack of blocks (conv or transposed conv, optional BatchNorm, an
activation chain, an optional residual add and constant affine op, optional pooling) and a
linear head with optional BatchNorm1d; the optimized module must match eager within
``pyrys.FP32_TOLERANCE`` and pass the verifier after every pass.
"""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyrys
from pyrys.testing import randomize_batchnorm

ACTIVATIONS = {
    "relu": torch.relu, "relu6": F.relu6, "leaky_relu": lambda y: F.leaky_relu(y, 0.1), "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "silu": F.silu, "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "elu": F.elu, "mish": F.mish,
    "clamp": lambda y: torch.clamp(y, -0.5, 0.5),
}

block = st.fixed_dictionaries({
    "transposed": st.booleans(),
    "kernel": st.sampled_from([1, 3]),
    "padding": st.sampled_from([0, 1]),
    "bn": st.booleans(),
    "activations": st.lists(st.sampled_from(sorted(ACTIVATIONS)), max_size=2),
    "residual": st.booleans(),
    "affine": st.sampled_from(["none", "scalar", "channel"]),
    "pool": st.sampled_from(["none", "max", "avg"]),
})


class Block(torch.nn.Module):
    def __init__(self, spec: dict, channels: int):
        super().__init__()
        self.spec = spec
        conv = torch.nn.ConvTranspose2d if spec["transposed"] else torch.nn.Conv2d
        self.conv = conv(channels, channels, spec["kernel"], padding=spec["padding"] if spec["kernel"] == 3 else 0)
        self.bn = torch.nn.BatchNorm2d(channels) if spec["bn"] else torch.nn.Identity()
        self.register_buffer("scale", torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.spec["affine"] == "scalar":
            y = y * 1.5 - 0.25
        elif self.spec["affine"] == "channel":
            y = y / self.scale
        for name in self.spec["activations"]:
            y = ACTIVATIONS[name](y)
        if self.spec["residual"] and y.shape == x.shape:
            y = torch.relu(y + x)
        if self.spec["pool"] == "max":
            y = F.max_pool2d(y, 2, ceil_mode=True)
        elif self.spec["pool"] == "avg":
            y = F.avg_pool2d(y, 2, ceil_mode=True)
        return y


class Net(torch.nn.Module):
    def __init__(self, specs: list[dict], head_bn: bool, channels: int = 4):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, channels, 1)
        self.blocks = torch.nn.Sequential(*(Block(spec, channels) for spec in specs))
        self.head = torch.nn.Linear(channels, 5)
        self.head_bn = torch.nn.BatchNorm1d(5) if head_bn else torch.nn.Identity()

    def forward(self, x):
        y = self.blocks(self.stem(x))
        return self.head_bn(self.head(y.mean((2, 3))))


# derandomized: CI sees the same examples every run (set derandomize=False locally to explore);
# ``backend`` (tests/conftest.py) is a plain string, so sharing it between examples is safe
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(specs=st.lists(block, min_size=1, max_size=3), head_bn=st.booleans(), seed=st.integers(0, 1000))
def test_random_conv_nets_optimize_to_the_same_function(backend, specs, head_bn, seed):
    torch.manual_seed(seed)
    model = randomize_batchnorm(Net(specs, head_bn), seed).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= pyrys.FP32_TOLERANCE
    assert "aten::batch_norm" not in opt.graph
