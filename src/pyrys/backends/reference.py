"""The reference backend: the optimized graph run with plain torch ops.

It runs anywhere and is the correctness oracle for the tests.  Module state that was
not frozen is passed in from the values captured with the graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.backends.options import BackendOptions, ThreadPinned
from pyrys.ir.graph import state_ref


class ReferenceProgram:
    """Calls the graph module with state values and user inputs in placeholder order."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.state = {i: state_ref(n).value for i, n in enumerate(placeholders) if state_ref(n)}
        self.arity = len(placeholders)

    def __call__(self, inputs: list) -> list:
        user = iter(inputs)
        args = [self.state[i] if i in self.state else next(user) for i in range(self.arity)]
        with torch.no_grad():
            return list(self.gm(*args))

    def describe(self) -> str:
        return "reference backend: the optimized graph run with torch ops"


def compile_program(gm: fx.GraphModule, example_inputs: list, options: BackendOptions = BackendOptions()):
    program = ReferenceProgram(gm)
    return ThreadPinned(program, options.threads) if options.threads else program
