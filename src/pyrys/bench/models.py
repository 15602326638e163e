"""Models to benchmark: torchvision by name or ``module:attr``.

There is no network, so torchvision models come from :func:`pyrys.testing.torchvision_model`
(random weights, as the tests and the zoo build them). Random BatchNorm statistics of mean 0
and variance 1 are unrealistic (they make folding trivial), so every BatchNorm of a
``module:attr`` model too gets seeded random running stats and affine params.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pyrys.model_specs import load_model, own_example_inputs
from pyrys.testing import input_size, randomize_batchnorm

def build_model(name: str) -> nn.Module:
    """A torchvision model or a zoo transformer (``hf_bert``) by name, or ``module:attr`` (:mod:`pyrys.model_specs`:
    an nn.Module or a factory of one; a copy, its BatchNorms randomized), in eval mode."""
    model = load_model(name)
    if ":" not in name:
        return model.eval()
    return randomize_batchnorm(copy.deepcopy(model)).eval()  # (a copy: the module may hold the one it gives)


def example_inputs(name: str, batch_size: int, model: nn.Module | None = None) -> tuple:
    """The model's own ``example_inputs(batch)`` (:func:`~pyrys.model_specs.own_example_inputs`), else seeded
    random images."""
    own = None if model is None else own_example_inputs(name, model, batch_size)
    if own is not None:
        return own
    size = input_size(name)
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch_size, 3, size, size, generator=generator),)


class TinyConvNet(nn.Module):
    """A few conv/BN/ReLU layers and a classifier: the ``--quick`` model."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def tiny_convnet() -> nn.Module:
    """The ``--quick`` model, seeded."""
    torch.manual_seed(0)
    return TinyConvNet()


class ConvChain(nn.Module):
    """20 tiny 3x3 convolutions (16 channels, 8x8): per-op overhead dominates, not arithmetic."""

    def __init__(self, length: int = 20, channels: int = 16) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1) for _ in range(length)])
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, self.channels, 8, 8, generator=torch.Generator().manual_seed(1)),)


def conv_chain() -> nn.Module:
    """``pyrys bench --models pyrys.bench.models:conv_chain``: divide the median by 20 for µs per op."""
    torch.manual_seed(0)
    return ConvChain()


class EncoderLayer(nn.Module):
    """One BERT layer: fused QKV projection, attention with an additive mask, GELU MLP, post-norms."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads) + mask
        h = self.norm1(h + self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)))
        return self.norm2(h + self.down(nn.functional.gelu(self.up(h))))


class Encoder(nn.Module):
    """BERT-base width (768, 12 heads), token + position embeddings and a padding mask; inputs
    ``(ids, mask)`` of ``tokens`` each.  Written out here: ``transformers`` is an optional extra."""

    def __init__(self, layers: int = 12, width: int = 768, heads: int = 12, tokens: int = 128) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(30522, width), nn.Embedding(512, width)
        self.norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(EncoderLayer(width, heads) for _ in range(layers))
        self.length = tokens

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.norm(self.tokens(ids) + self.positions(positions))
        bias = (1.0 - mask[:, None, None, :]) * -10000.0
        for layer in self.layers:
            h = layer(h, bias)
        return h

    def example_inputs(self, batch_size: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens or self.length
        ids = torch.randint(0, 30522, (batch_size, tokens), generator=torch.Generator().manual_seed(tokens))
        return ids, torch.ones(batch_size, tokens)


def bert4() -> nn.Module:
    """``pyrys.bench.models:bert4``: the encoder with 4 layers, seeded."""
    torch.manual_seed(0)
    return Encoder(layers=4)


def bert_base() -> nn.Module:
    """``pyrys.bench.models:bert_base``: the encoder with BERT-base's 12 layers (110M parameters), seeded."""
    torch.manual_seed(0)
    return Encoder(layers=12)


class Conv1D(nn.Module):
    """HF transformers' GPT-2 ``Conv1D``: ``addmm`` on the leading dims flattened, weight ``(in, out)``."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.02)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-0.1, 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()[:-1] + (self.out_features,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)


class Gpt2Mlp(nn.Module):
    """GPT-2's MLP with its residual: ``x + c_proj(gelu_tanh(c_fc(x)))``, inputs of ``tokens`` each."""

    def __init__(self, width: int = 768, tokens: int = 64) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * width, width), Conv1D(width, 4 * width)
        self.width, self.tokens = width, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, self.tokens, self.width, generator=torch.Generator().manual_seed(0)),)


def gpt2_mlp() -> nn.Module:
    """``pyrys.bench.models:gpt2_mlp``: GPT-2's MLP block at its widths (768 -> 3072 -> 768), seeded."""
    torch.manual_seed(0)
    return Gpt2Mlp()
