import torch

from pyrys.demo import Foo
from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image

FOO_BEFORE = """\
graph(%x : Float(10)):
  %full : Float(1) = aten::full([1], 1.0, device=cpu, pin_memory=False)
  %add : Float(1) = aten::add(%full, 2)
  %add_1 : Float(1) = aten::add(%add, 3)
  %add_2 : Float(1) = aten::add(%add_1, 4)
  %add_3 : Float(10) = aten::add(%x, %add_2)
  return (%add_3)"""

FOO_AFTER = """\
graph(%x : Float(10)):
  %add_6 : Float(1) = prim::Constant[value={10}]()
  %add_3 : Float(10) = aten::add(%x, %add_6)
  return (%add_3)"""


def test_seed_foo_folds_to_ten(run_passes):
    result = run_passes(Foo().eval(), (torch.rand(10),), "constant_propagation", "dead_code_elimination")
    assert result.before == FOO_BEFORE
    assert result.after == FOO_AFTER
    assert result.fired("constant_propagation") == {"folded": 4}
    assert result.error() <= TOLERANCE


def test_fold_nodes_on_frozen_weights_become_constants(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_params", "freeze_flags", "fold_conv_bn",
                        "constant_propagation", "dead_code_elimination")
    assert result.fired("constant_propagation") == {"folded": 2}
    assert "pyrys::fold_" not in result.after
    assert result.after.count("prim::Constant") == 2
    assert result.error() <= TOLERANCE


def test_unfrozen_inputs_block_folding(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_flags", "fold_conv_bn", "constant_propagation")
    assert result.fired("constant_propagation") == {}
    assert result.fired("fold_conv_bn") == {}


class Growing(torch.nn.Module):
    def forward(self, x):
        return x + torch.ones(1).expand(512, 1024)


def test_results_much_larger_than_inputs_are_not_folded(run_passes):
    result = run_passes(Growing().eval(), (torch.rand(512, 1024),), "constant_propagation", "dead_code_elimination")
    assert "aten::expand" in result.after
    assert result.fired("constant_propagation") == {"folded": 1}  # aten::ones only
    assert result.error() <= TOLERANCE


class Random(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand(3)


def test_random_ops_are_never_folded(run_passes):
    result = run_passes(Random().eval(), (torch.rand(3),), "constant_propagation")
    assert "aten::rand" in result.after
    assert result.fired("constant_propagation") == {}


class QueryApartFromKeyValue(torch.nn.Module):
    """nn.MultiheadAttention whose query is not its key and value: its in-projection weight is split in two."""

    def __init__(self):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, memory):
        return self.attention(x, memory, memory, need_weights=False)[0]


def test_the_parts_of_a_split_weight_become_constants(run_passes):
    """``getitem(split_with_sizes(W))`` stayed computed: the linears reading the parts ran in torch (float32
    under int8, each a miss "its weight is not a float32 constant"; a helper's find)."""
    torch.manual_seed(0)
    result = run_passes(QueryApartFromKeyValue().eval(), (torch.randn(2, 5, 32), torch.randn(2, 7, 32)),
                        "freeze_params", "constant_propagation", "dead_code_elimination")
    assert "split" not in result.after and "TupleIndex" not in result.after
    assert result.fired("constant_propagation") == {"folded": 4}  # the two parts of the weight and of the bias
    assert result.error() <= TOLERANCE


class ViewsAFoldedTranspose(torch.nn.Module):
    """A value of the weights alone with a transpose's strides, then viewed: legal on those strides only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.p = torch.nn.Parameter(torch.randn(1, 5, 4, 8))
        self.w = torch.nn.Parameter(torch.randn(32, 16))

    def forward(self, x):
        t = self.p.transpose(1, 2) * 2.0
        y = x + t.transpose(1, 2).view(1, 5, 32)
        return torch.nn.functional.linear(y, self.w.t() * 1.5), self.p.permute(0, 2, 1, 3) + 1


def test_a_folded_value_keeps_the_strides_it_was_traced_with():
    """A folded constant was made contiguous: the view after it, legal on the traced strides, raised torch's
    "Cannot view a tensor" (HF DeBERTa's p2c attention, Conditional DETR; a helper's find)."""
    import pyrys

    model, x = ViewsAFoldedTranspose().eval(), torch.randn(1, 5, 32)
    for backend in pyrys.available_backends():
        opt = pyrys.optimize(model, (x,), backend=backend)
        with torch.no_grad():
            assert all(pyrys.relative_error(a, b) <= TOLERANCE for a, b in zip(opt(x), model(x))), backend
