"""Outputs laid out as eager's: contiguous where eager's are, and a torch step's result in eager's strides
(``ir/output_layouts.py``, ``backends/dnnl/assemble.py``)."""
import pytest
import torch
from torch import nn

import pyrys
from tests.conftest import TOLERANCE


class TwoHeads(nn.Module):
    """Two linears on one feature (merged into one by ``simplify``), each an output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cls, self.box = nn.Linear(4, 4), nn.Linear(4, 6)

    def forward(self, h):
        return self.cls(h), self.box(h)


class CacheStep(nn.Module):
    """A decoder step's keys appended to a cache that may be empty (``simplify`` drops the empty operand)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.key = nn.Linear(16, 16)

    def forward(self, x, cache):
        batch, length, _ = x.shape
        return torch.cat([cache, self.key(x).view(batch, length, 2, 8).transpose(1, 2)], 2)


class PermutedResults(nn.Module):
    """Results of ops on a channels-last view of a convolution's output (eager keeps its strides), in types
    oneDNN has and has not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)
        return torch.where(h > 0, h, -h), h.exp(), h > 0, h.double(), h.relu()


def _same_layouts(got, expected) -> None:
    for a, b in zip(got, expected):
        assert a.stride() == b.stride() and a.is_contiguous() == b.is_contiguous()
    assert pyrys.relative_error(got, expected) <= TOLERANCE


@pytest.mark.parametrize("dynamic", [False, True])
def test_merged_linears_return_contiguous_outputs(backend, dynamic):
    """A helper's find: each head came back a column slice of the merged product (strides (10, 1)), and a
    caller's ``y.view(-1)`` raised where eager's worked."""
    model, x = TwoHeads().eval(), torch.randn(3, 4)
    opt = pyrys.optimize(model, (x,), backend=backend, dynamic=dynamic)
    for rows in (3, 5):
        x = torch.randn(rows, 4)
        got = opt(x)
        _same_layouts(got, model(x))
        assert got[0].view(-1).shape == (rows * 4,)


@pytest.mark.parametrize("cached", [0, 3])
def test_keys_appended_to_an_empty_cache_are_contiguous(backend, cached):
    """A helper's find: with the empty cache dropped, the transposed keys were the output (strides (64, 8, 16, 1))."""
    model = CacheStep().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 4, 16), torch.randn(2, 2, cached, 8)), backend=backend)
    for length in (0, 3):
        inputs = (torch.randn(2, 4, 16), torch.randn(2, 2, length, 8))
        _same_layouts([opt(*inputs)], [model(*inputs)])


def test_results_of_torch_steps_keep_eagers_strides(backend):
    """A helper's find: ``exp``, ``where``, ``> 0`` and ``double()`` of a permuted activation came back
    contiguous from the dnnl program (its torch steps run on compact tensors), permuted in eager."""
    model, x = PermutedResults().eval(), torch.randn(2, 4, 3, 5)
    opt = pyrys.optimize(model, (x,), backend=backend)
    got, expected = opt(x), model(x)
    assert [a.dtype for a in got] == [b.dtype for b in expected]
    _same_layouts([a.double() if a.dtype == torch.bool else a for a in got],
                  [b.double() if b.dtype == torch.bool else b for b in expected])


class ViewOfATorchStep(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        e = self.conv(x).permute(0, 2, 3, 1).exp()
        g = e > 1
        return e, e[..., :2], g, g[..., :2]


def test_a_view_of_an_output_in_eagers_strides_views_it(backend):
    """A reviewer's find: with the torch step's result laid out as eager's (permuted), the view of it was made
    from the program's own copy: a write into the output missed the view."""
    model, x = ViewOfATorchStep().eval(), torch.randn(2, 4, 5, 5)
    opt = pyrys.optimize(model, (x,), backend=backend)
    got, expected = opt(x), model(x)
    assert [a.stride() for a in got] == [b.stride() for b in expected]
    got[0].zero_()
    got[2].fill_(True)
    assert bool((got[1] == 0).all()) and bool(got[3].all())


class NormsOfTransposes(nn.Module):
    """Batch norms of transposed activations: eager's CPU kernel lays out each result as its input suggests
    (contiguous below 4-D and for a transposed image, channels-last for a channels-last one); torch's meta
    keeps the input's strides."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sequence, self.image = nn.BatchNorm1d(8), nn.BatchNorm2d(8)
        for norm in (self.sequence, self.image):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)

    def forward(self, x, image):
        return self.sequence(x.transpose(1, 2)), self.image(image.transpose(2, 3)), \
            self.image(image.contiguous(memory_format=torch.channels_last)), \
            torch.relu(self.sequence(x.transpose(1, 2))), self.image(image.transpose(2, 3)) + 1


@pytest.mark.parametrize("dynamic", [False, True])
def test_batch_norms_of_transposes_are_laid_out_as_eagers(backend, dynamic):
    """Left alone before: the batch norm of ``x.transpose(1, 2)`` came back transposed (strides (40, 1, 8)),
    eager's contiguous, so ``y.view(-1)`` raised; so did a relu of it, or it plus 1 (a reviewer's find)."""
    model = NormsOfTransposes().eval()
    inputs = (torch.randn(2, 5, 8), torch.randn(2, 8, 4, 6))
    opt = pyrys.optimize(model, inputs, backend=backend, dynamic=dynamic)
    got, expected = opt(*inputs), model(*inputs)
    assert [a.is_contiguous() for a in got] == [b.is_contiguous() for b in expected] == [True, True, False, True, True]
    assert got[2].is_contiguous(memory_format=torch.channels_last)
    assert pyrys.relative_error(got, expected) <= TOLERANCE
    assert got[0].view(-1).shape == (80,)
