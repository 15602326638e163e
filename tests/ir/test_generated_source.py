"""torch.fx's generated source is forgotten once no graph runs it: before, every recompile (each pass, each
shape rebuilt past ``max_shapes``) left an entry for ever (a stress helper: 25 per ResNet-18 optimize,
3.8 per call with shapes taking turns)."""
from __future__ import annotations

import gc
import linecache

import torch
from torch import nn

import pyrys
from pyrys.ir.generated_source import PREFIX, _loader_cache, forget_dead_sources


def generated() -> int:
    return sum(key.startswith(PREFIX) for key in _loader_cache() if isinstance(key, str))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_optimize_and_delete_leaves_no_source_behind():
    net, x = model(), torch.randn(1, 3, 16, 16)
    counts = []
    for _ in range(4):
        opt = pyrys.optimize(net, (x,))  # its end forgets what the one before left (collected below)
        counts.append(generated())
        opt(x)
        del opt
        gc.collect()
    assert counts[-1] <= counts[1]  # before: about 20 more a cycle


def test_shapes_taking_turns_past_max_shapes_leave_no_source_behind():
    net = model()
    opt = pyrys.optimize(net, (torch.randn(1, 3, 16, 16),), max_shapes=2)
    counts = []
    for round_index in range(3):
        for batch in range(2, 7):
            x = torch.randn(batch, 3, 16, 16)
            assert pyrys.relative_error(opt(x), net(x)) <= 1e-4
        counts.append(generated())
        gc.collect()
    assert counts[-1] <= counts[1]


def test_a_live_graph_keeps_its_source_for_tracebacks():
    opt = pyrys.optimize(model(), (torch.randn(1, 3, 16, 16),))
    forget_dead_sources()
    code = type(opt.graph_module).forward.__code__
    assert code.co_filename.startswith(PREFIX) and "".join(linecache.getlines(code.co_filename)).strip()
