"""Two small models of matrix products between computed tensors, for ``benchmarks/ab_latency.py``.

    python benchmarks/ab_latency.py --old <worktree>/src --models matmul_models:relu_attention matmul_models:gated_products
    (run from benchmarks/, or with benchmarks/ on PYTHONPATH)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

class ReluAttention(nn.Module):
    """Attention without softmax (relu of the scaled scores): bmm, scale, relu, bmm: not an SDPA pattern."""
    def __init__(self, width=256, heads=4, length=128):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out, self.h, self.n, self.w = nn.Linear(width, 3 * width), nn.Linear(width, width), heads, length, width
        self.eval()
    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        s = torch.relu(q @ k.transpose(-1, -2) * (1.0 / 8)) / n
        return self.out((s @ v).transpose(1, 2).reshape(b, n, self.w))
    def example_inputs(self, batch):
        return (torch.randn(batch, self.n, self.w, generator=torch.Generator().manual_seed(1)),)

def relu_attention():
    return ReluAttention()

class GatedProducts(nn.Module):
    """Two computed matrices multiplied, GELU after, a residual add: mm-family with post-ops."""
    def __init__(self, width=256, length=128):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.n, self.w = nn.Linear(width, width), nn.Linear(width, width), length, width
        self.eval()
    def forward(self, x):
        return F.gelu(torch.bmm(self.a(x), self.b(x).transpose(1, 2)) @ x) + x
    def example_inputs(self, batch):
        return (torch.randn(batch, self.n, self.w, generator=torch.Generator().manual_seed(1)),)

def gated_products():
    return GatedProducts()
