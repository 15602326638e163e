"""The If node: branches held by the graph module (copy, pickle, print), DCE, no torch.fx globals."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import pyrys
from pyrys.capture.torchscript import capture_torchscript
from pyrys.ir.control_flow import IF, BranchRaised
from pyrys.ir.graph import call_nodes, replace_with_literal, state_inputs
from pyrys.ir.meta import refresh_meta
from pyrys.ir.printer import format_graph
from pyrys.passes.cleanup import common_subexpression_elimination, dead_code_elimination
from pyrys.passes.constant_propagation import constant_propagation
from pyrys.passes.control_flow import inline_constant_ifs
from tests.conftest import TOLERANCE


class Gate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.twice = True

    def forward(self, x):
        if self.twice:
            y = x * 2.0
        else:
            y = torch.relu(x) + 1.0
        return y


class Strict(torch.nn.Module):
    """An If with no outputs whose one branch raises: only the check keeps it."""

    def __init__(self):
        super().__init__()
        self.strict = False

    def forward(self, x):
        if self.strict:
            raise RuntimeError("strict mode")
        return x - 1.0


def script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model)


def capture(model, x):
    captured = capture_torchscript(script(model), (x,))
    refresh_meta(captured.gm)
    return captured


X = torch.linspace(-1.0, 1.0, 4)

GATE = """\
graph(%self : ClassType<Gate>,
      %x : Float(4)):
  %twice : bool = prim::GetAttr[name="twice"](%self)
  %If : (Float(4)) = pyrys::If(%twice, [%x])
    block0(%x : Float(4)):
      %y : Float(4) = aten::mul(%x, 2.0)
      -> (%y)
    block1(%x : Float(4)):
      %relu : Float(4) = aten::relu(%x)
      %y : Float(4) = aten::add(%relu, 1.0, 1)
      -> (%y)
  %y : Float(4) = prim::TupleIndex(%If, 0)
  return (%y)"""

STRICT = """\
graph(%self : ClassType<Strict>,
      %x : Float(4)):
  %strict : bool = prim::GetAttr[name="strict"](%self)
  %If : () = pyrys::If(%strict, [])
    block0():
      prim::RaiseException('strict mode')
      -> ()
    block1():
      -> ()
  %sub : Float(4) = aten::sub(%x, 1.0, 1)
  return (%sub)"""


def test_the_printed_graph_shows_both_branches_as_blocks():
    gate, strict = capture(Gate(), X), capture(Strict(), X)
    assert format_graph(gate.gm, gate.class_name) == GATE
    assert format_graph(strict.gm, strict.class_name) == STRICT


def test_branches_are_submodules_of_the_graph_module():
    gm = capture(Gate(), X).gm
    (node,) = call_nodes(gm.graph, {IF})
    _, then, otherwise, _ = node.args
    assert (then.op, otherwise.op) == ("get_attr", "get_attr")
    assert isinstance(getattr(gm, then.target), torch.fx.GraphModule)
    assert {name for name, _ in gm.named_children()} == {then.target, otherwise.target}


def test_deepcopy_runs_and_prints_the_same_and_shares_no_branch():
    captured = capture(Gate(), X)
    copied = copy.deepcopy(captured.gm)
    for flag in (True, False):
        assert torch.equal(copied(X, flag)[0], captured.gm(X, flag)[0])
    before = format_graph(captured.gm, "Gate")
    assert format_graph(copied, "Gate") == before
    assert all(a is not b for a, b in zip(copied.children(), captured.gm.children()))
    inline_constant_ifs(_with_flag(copied, False))  # changing the copy leaves the original whole
    assert format_graph(captured.gm, "Gate") == before


def test_a_pickled_graph_module_keeps_its_branches():
    gm = capture(Gate(), X).gm
    loaded = pickle.loads(pickle.dumps(gm))  # torch.fx traces the loaded code again: the If is one call
    for flag in (True, False):
        assert torch.equal(loaded(X, flag)[0], gm(X, flag)[0])


def test_two_graphs_in_one_process_see_only_their_own_branches():
    gate, strict = capture(Gate(), X), capture(Strict(), X)
    assert gate.gm.if_then is not strict.gm.if_then  # the same names, each graph's own modules
    assert torch.equal(gate.gm(X, True)[0], X * 2.0)
    assert torch.equal(gate.gm(X, False)[0], torch.relu(X) + 1.0)
    assert torch.equal(strict.gm(X, False)[0], X - 1.0)


def test_an_if_whose_taken_branch_raises_survives_dce_and_cse():
    gm = capture(Strict(), X).gm
    (node,) = call_nodes(gm.graph, {IF})
    assert not node.users
    assert dead_code_elimination(gm).fired == {}
    assert common_subexpression_elimination(gm).fired == {}
    assert constant_propagation(gm).fired == {}
    assert list(call_nodes(gm.graph, {IF})) == [node]
    with pytest.raises(BranchRaised, match="strict mode"):
        gm(X, True)


def test_importing_pyrys_adds_nothing_to_torch_fx_side_effect_table():
    """torch adds its own entries as pyrys imports parts of it (dynamo, distributed); pyrys adds none."""
    code = ("import torch.fx.node as n; before = set(n._side_effectful_functions); import pyrys.capture.torchscript, "
            "pyrys.passes.pipeline; added = set(n._side_effectful_functions) - before; "
            "assert not [f for f in added if 'pyrys' in f\"{getattr(f, '__module__', '')} {f!r}\"], added")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert IF not in torch.fx.node._side_effectful_functions


def test_inlining_takes_the_branch_and_releases_both():
    gm = capture(Gate(), X).gm
    inline_constant_ifs(_with_flag(gm, False))
    dead_code_elimination(gm)
    assert list(gm.named_children()) == []
    assert "pyrys::If" not in format_graph(gm) and "aten::relu" in format_graph(gm)
    assert torch.equal(gm(X)[0], torch.relu(X) + 1.0)


@pytest.mark.parametrize("backend", pyrys.available_backends())
def test_two_threads_run_the_same_if_at_once(backend):
    model = Gate().eval()
    x = torch.rand(2, 3, 8, 8) - 0.5
    opt = pyrys.optimize(script(model), (x,), backend=backend, freeze_flags=())
    assert "pyrys::If(%twice" in opt.graph
    inputs = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) - 0.5 for i in range(64)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(opt, inputs))
    assert all(pyrys.relative_error(y, model(i)) <= TOLERANCE for y, i in zip(results, inputs))


def _with_flag(gm: torch.fx.GraphModule, value: bool) -> torch.fx.GraphModule:
    """``gm`` with its one flag replaced by ``value`` (what ``freeze_flags`` does with the captured value)."""
    (flag,) = state_inputs(gm.graph)
    replace_with_literal(flag, value)
    gm.recompile()
    return gm
