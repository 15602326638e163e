"""An ExportedProgram in, as it is: no re-export, the user's program untouched."""
from __future__ import annotations

import pytest
import torch

import pyrys
from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image


def test_exported_program_uses_its_own_example_inputs():
    model = conv_bn_relu()
    ep = torch.export.export(model, (image(),))
    opt = pyrys.optimize(ep, backend="reference", verify=True)
    assert opt.frontend == "ExportedProgram"
    assert "pyrys::conv2d_relu" in opt.graph and "batch_norm" not in opt.graph
    assert pyrys.relative_error(opt(image()), model(image())) <= TOLERANCE


def test_train_mode_program_state_is_not_written():
    model = conv_bn_relu().train()
    x = image(batch=2)
    ep = torch.export.export(model, (x,))
    before = {k: v.clone() for k, v in ep.state_dict.items()}
    with pytest.warns(UserWarning, match="exported in training mode; BatchNorm uses its batch's statistics"):
        opt = pyrys.optimize(ep, (x,), backend="reference")  # (a helper's find: said nothing, training False)
    assert "BatchNorm is in training mode" in opt.report() and opt.training
    opt(x)
    assert all(torch.equal(before[k], v) for k, v in ep.state_dict.items())


def test_an_eval_mode_program_says_nothing_of_training(recwarn):
    opt = pyrys.optimize(torch.export.export(conv_bn_relu().eval(), (image(),)), backend="reference")
    assert not opt.training and not [w for w in recwarn if "training mode" in str(w.message)]


def test_a_new_shape_asks_for_a_new_export():
    ep = torch.export.export(conv_bn_relu(), (image(),))
    opt = pyrys.optimize(ep, backend="reference")
    with pytest.raises(pyrys.InputError, match="Export it again"):
        opt(image(batch=2))


@pytest.mark.parametrize("dims, batch, dtype, says", [(None, 2, torch.float32, "to be equal to 1"),
                                                       ("B", 9, torch.float32, "to be <= 8"),
                                                       ("B", 1, torch.float32, "outside its range"),
                                                       (None, 1, torch.float64, "is torch.float64, exported as")])
def test_example_inputs_the_program_was_not_exported_for_are_an_input_error(dims, batch, dtype, says):
    """Not an internal error from the graph run on inputs it was not traced for (a static export's batch)."""
    dynamic = None if dims is None else ({0: torch.export.Dim(dims, min=2, max=8)},)
    ep = torch.export.export(conv_bn_relu(), (image(batch=1 if dims is None else 2),), dynamic_shapes=dynamic)
    with pytest.raises(pyrys.InputError, match=f"example inputs do not fit this ExportedProgram .*{says}"):
        pyrys.optimize(ep, (image(batch=batch).to(dtype),), backend="reference")


class Keywords(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, a, b=None, c=None):
        return self.linear(a) * 2 + b - c


def test_keyword_example_inputs_in_another_order_than_exported_keep_their_names(backend):
    """``{"c": c, "b": b}`` for an export of ``b=, c=``: the program bound them in the order given (error 2.2)."""
    a, b, c = torch.rand(3, 4), torch.rand(3, 4), 10 * torch.rand(3, 4)
    ep = torch.export.export(Keywords().eval(), (a,), {"b": b, "c": c})
    expected = ep.module()(a, b=b, c=c)
    opt = pyrys.optimize(ep, (a,), {"c": c, "b": b}, backend=backend)
    assert pyrys.relative_error(opt(a, b=b, c=c), expected) <= TOLERANCE
    assert pyrys.relative_error(opt(a, c=c, b=b), expected) <= TOLERANCE
    with pytest.raises(pyrys.InputError, match=r"keyword inputs \['b'\], exported with \['b', 'c'\]"):
        pyrys.optimize(ep, (a,), {"b": b}, backend=backend)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_exported_torchvision_model_matches_eager(name, backend):
    from pyrys.testing import torchvision_model

    model = torchvision_model(name)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    opt = pyrys.optimize(torch.export.export(model, (x,)), backend=backend)
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    assert "batch_norm" not in opt.graph


@pytest.mark.parametrize("read_back", [False, True])
def test_a_program_exported_with_dynamic_shapes_runs_every_size_its_ranges_allow(backend, read_back, tmp_path):
    """``Dim("B", min=1, max=8)``: the program's ranges say [1, 8] (its shape env [2, 8]); batch 1 runs, 9 is
    refused. Read back by ``torch.export.load``, its functionalization added ``Ne(s, 1)``, and batch 1 was
    refused (a helper's find)."""
    model = conv_bn_relu()
    batch = torch.export.Dim("B", min=1, max=8)
    ep = torch.export.export(model, (image(batch=2),), dynamic_shapes=({0: batch},))
    if read_back:
        torch.export.save(ep, tmp_path / "model.pt2")
        ep = torch.export.load(tmp_path / "model.pt2")
    opt = pyrys.optimize(ep, backend=backend)
    for size in (2, 1, 8, 3):
        assert pyrys.relative_error(opt(image(batch=size)), model(image(batch=size))) <= TOLERANCE
    with pytest.raises(pyrys.InputError, match=r"outside its range \[1, 8\]"):
        opt(image(batch=9))


class MergesTwoDims(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0] * x.shape[1], -1) * 2


def test_a_program_read_back_runs_sizes_of_one_its_retrace_guards_in_products(tmp_path):
    """Read back by ``torch.export.load``, a reshape merging two Dims of ``[1, 6]`` and ``[1, 9]`` refused
    ``(1, 1, 5)`` (its functionalization guarded ``Ne(s0*s1, s1)``, ``Ne(Mod(s1, s0*s1), 0)``, ``Ne(s0*s1, 1)``);
    a second ``optimize`` of the same program refused ``(4, 1, 5)`` too (the first's retrace had added
    ``Ne(s0, 1)`` to the program's shape env, then taken for the program's own). A helper's find."""
    dims = {0: torch.export.Dim("B", min=1, max=6), 1: torch.export.Dim("T", min=1, max=9)}
    torch.export.save(torch.export.export(MergesTwoDims(), (torch.randn(2, 3, 5),), dynamic_shapes=(dims,)),
                      tmp_path / "model.pt2")
    ep = torch.export.load(tmp_path / "model.pt2")
    for _ in range(2):
        opt = pyrys.optimize(ep)
        for shape in ((1, 1, 5), (4, 1, 5), (1, 4, 5), (6, 9, 5)):
            x = torch.randn(shape)
            assert torch.equal(opt(x), MergesTwoDims()(x)), shape
    with pytest.raises(pyrys.InputError, match=r"outside its range \[1, 9\]"):
        opt(torch.randn(2, 10, 5))


class ChecksAProduct(torch.nn.Module):
    def forward(self, x, y):
        torch._check(x.shape[0] * x.shape[1] != y.shape[0])
        return x.sum() + y.sum()


def test_a_guard_that_fails_where_no_size_is_one_is_held_after_a_read_back(tmp_path):
    """``Ne(s0*s1, s2)`` (the program's own ``torch._check``) was set aside as failing only at 1 (sizes 1, 2, 3
    and 7 were tried: 2 * 2 = 4 never was), and ``(2, 2), (4,)`` ran where the program refuses it (a review's
    find): a polynomial guard is set aside only where it is proven to hold from 2."""
    dims = ({0: torch.export.Dim("a", min=1, max=8), 1: torch.export.Dim("b", min=1, max=8)},
            {0: torch.export.Dim("c", min=1, max=8)})
    example = (torch.randn(2, 3), torch.randn(5))
    torch.export.save(torch.export.export(ChecksAProduct(), example, dynamic_shapes=dims), tmp_path / "model.pt2")
    opt = pyrys.optimize(torch.export.load(tmp_path / "model.pt2"), example)
    with pytest.raises(pyrys.InputError, match="the graph assumes"):
        opt(torch.ones(2, 2), torch.ones(4))
    assert torch.equal(opt(torch.ones(1, 3), torch.ones(5)), ChecksAProduct()(torch.ones(1, 3), torch.ones(5)))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided slice"])
def test_an_input_in_another_layout_than_exported_gives_eagers_result(layout, backend):
    """The program's ``flatten`` is a ``view`` after its decomposition, valid for the strides it was exported
    with only; a caller's input in another layout must still give eager's result."""
    model = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(216, 5)).eval()
    x = torch.randn(2, 3, 12, 6)
    inputs = {"transposed": x.transpose(-1, -2).contiguous().transpose(-1, -2),
              "channels_last": x.contiguous(memory_format=torch.channels_last),
              "strided slice": torch.randn(2, 3, 12, 12)[..., ::2]}
    opt = pyrys.optimize(torch.export.export(model, (x,)), backend=backend)
    assert pyrys.relative_error(opt(inputs[layout]), model(inputs[layout])) <= TOLERANCE


def test_a_program_exported_from_an_expanded_input_takes_a_dense_one(backend):
    """Captured strides with a 0 (an expanded example) are no layout to copy a caller's input into."""
    model = torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.ReLU()).eval()
    example = torch.rand(3).expand(4, 3)
    opt = pyrys.optimize(torch.export.export(model, (example,)), backend=backend)
    for x in (example, torch.rand(4, 3), torch.rand(3, 4).t()):
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


class WritesThroughAnAlias(torch.nn.Module):
    def forward(self, x, y):
        x.mul_(y)
        return x + y


def test_a_program_torch_cannot_functionalize_is_a_capture_error():
    x = torch.randn(2, 2)
    ep = torch.export.export(WritesThroughAnAlias(), (x, x))  # one tensor passed twice, written in place
    with pytest.raises(pyrys.CaptureError, match="cannot functionalize this ExportedProgram"):
        pyrys.optimize(ep)


class HalvesAndAdds(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x, y):
        return self.fc(x)[:, ::2] + y


def test_a_derived_dim_is_solved_for_its_symbol():
    """``2 * Dim("h")``: the sequence was bound only as ``2*s0``, so the example's own shape was refused with a
    raw ``ShapeMismatch``; now ``s0`` is solved from it, and a length no ``h`` gives is an ``InputError``."""
    h = torch.export.Dim("h", min=1, max=12)
    model = HalvesAndAdds().eval()
    ep = torch.export.export(model, (torch.randn(2, 4, 8), torch.randn(2, 2, 8)), dynamic_shapes=({1: 2 * h}, {1: h}))
    opt = pyrys.optimize(ep)
    for length in (4, 6, 24):
        inputs = (torch.randn(2, length, 8), torch.randn(2, length // 2, 8))
        assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= TOLERANCE
    with pytest.raises(pyrys.InputError, match="x dim 1 is 5, where the graph has 2\\*s\\d+ = 4"):
        opt(torch.randn(2, 5, 8), torch.randn(2, 2, 8))
    with pytest.raises(pyrys.InputError, match="= 13 is outside its range \\[1, 12\\]"):
        opt(torch.randn(2, 26, 8), torch.randn(2, 13, 8))


class _BranchesOnThree(torch.nn.Module):
    def forward(self, x):
        return x * 100 if x.shape[0] == 3 else x + 1


@pytest.mark.parametrize("read_back", [False, True])
def test_a_program_branching_on_a_size_refuses_that_size_read_back_too(read_back, tmp_path):
    """Exported at batch 2 with Dim.AUTO, the graph is the ``x + 1`` branch's and holds ``Ne(s, 3)``; read back
    by torch.export.load that guard was taken for one its functionalization adds and set aside, and batch 3
    ran the other branch's graph (a reviewer's find)."""
    ep = torch.export.export(_BranchesOnThree(), (torch.randn(2, 5),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    if read_back:
        torch.export.save(ep, tmp_path / "model.pt2")
        ep = torch.export.load(tmp_path / "model.pt2")
    opt = pyrys.optimize(ep)
    with pytest.raises(pyrys.InputError, match=r"the graph assumes Ne\(s\d+, 3\)"):
        opt(torch.randn(3, 5))
    x = torch.randn(4, 5)
    assert torch.equal(opt(x), x + 1)


def test_a_program_read_back_with_a_derived_dim_is_refused_saying_what_to_pass(tmp_path):
    """torch cannot functionalize it (``expected sympy.Symbol``); the advice was for another cause."""
    h = torch.export.Dim("h", min=1, max=12)
    ep = torch.export.export(HalvesAndAdds().eval(), (torch.randn(2, 4, 8), torch.randn(2, 2, 8)),
                             dynamic_shapes=({1: 2 * h}, {1: h}))
    torch.export.save(ep, tmp_path / "model.pt2")
    with pytest.raises(pyrys.CaptureError, match="pass the nn.Module.*read back by torch.export.load with a derived dim"):
        pyrys.optimize(torch.export.load(tmp_path / "model.pt2"))


def test_a_dim_out_of_its_range_is_named_and_dynamic_true_without_dims_says_so():
    """A helper's findings: the range error named the symbol alone (``s53 = 200``) and advised exporting "with
    dynamic_shapes" to a program that had them; ``dynamic=True`` on an export without dynamic dims (and on a
    trace) was taken without a word."""
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), torch.randn(2, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=16)},))
    with pytest.raises(pyrys.InputError, match=r"dim 0 \(s\d+\) = 20 is outside its range .*whose Dims hold it"):
        pyrys.optimize(ep, x)(torch.randn(20, 8))
    fixed = pyrys.optimize(torch.export.export(model, (x,)), x, dynamic=True)
    assert any("dynamic=True: this ExportedProgram has no dynamic dims" in note for note in fixed.notes)
    traced = pyrys.optimize(torch.jit.trace(model, x), x, dynamic=True)
    assert any("dynamic=True: a TorchScript import is specialized" in note for note in traced.notes)
    assert not any("dynamic=True" in note for note in pyrys.optimize(ep, x, dynamic=True).notes)


def test_an_input_passed_by_keyword_is_named_in_a_dtype_error():
    class Masked(torch.nn.Module):
        def forward(self, x, mask):
            return x * mask

    x = torch.randn(2, 3)
    opt = pyrys.optimize(Masked(), (x,), {"mask": x})
    with pytest.raises(pyrys.InputError, match="input 'mask' must have dtype torch.float32"):
        opt(x, mask=x.bool())
    with pytest.raises(pyrys.InputError, match="input 'mask' must be a dense"):
        opt(x, mask=x.to_sparse())
