"""Real models: torchvision classifiers with random weights and randomized BatchNorm statistics."""
import pytest
import torch

import pyrys
from pyrys.testing import torchvision_model
from tests.conftest import TOLERANCE

QUICK = ["resnet18", "mobilenet_v2"]


@pytest.mark.parametrize("name", QUICK)
def test_torchvision_model_matches_eager(name, backend):
    model = torchvision_model(name)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
    assert opt.backend == backend
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    convs = opt.history[0].graph.count("aten::conv2d")
    bns = opt.history[0].graph.count("aten::batch_norm")
    assert bns > 0 and "aten::batch_norm" not in opt.graph
    fold = next(step for step in opt.history if step.name == "fold_conv_bn")
    assert fold.fired == {"conv_bn": bns}
    assert opt.graph.count("aten::conv2d(") + opt.graph.count("pyrys::conv2d") == convs
    fuse = next(step for step in opt.history if step.name == "fuse_post_ops")
    fused = opt.graph.count("pyrys::conv2d_")  # activations and residual adds (conv2d_add) fuse
    assert fuse.fired["conv_activation"] + fuse.fired["binary_add"] >= fused > 0
    assert not [m for m in opt.misses if m.rule == "conv_bn"]
