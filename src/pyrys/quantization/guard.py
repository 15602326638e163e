"""The accuracy guard: the int8 ops that cost the most accuracy go back to float32 until the outputs on
the calibration data are within ``accuracy_budget`` of float32's.

    error(S) = max over the guard's samples of relative_error(outputs with the ops S in int8, float32 outputs)

If error(every op) > budget, each op's sensitivity error({op}) is measured alone, and ops go back to
float32, most sensitive first, until error(the rest) <= budget.  It costs one run of the graph (on the
reference backend, the rounding simulated) per int8 op and per op put back, on the first
:data:`GUARD_SAMPLES` calibration samples; nothing when the budget holds with every op in int8.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from pyrys.backends.reference import ReferenceProgram
from pyrys.numerics import relative_error

GUARD_SAMPLES = 4  # calibration samples the guard measures on


@dataclass
class Switch:
    """One int8 op: its arguments in float32 and in int8 (reading the quantize/dequantize nodes); ``readers``:
    other ops reading its result in int8 while it is in int8, with their two argument tuples likewise."""

    layer: fx.Node
    float_args: tuple
    int8_args: tuple
    readers: list[tuple[fx.Node, tuple, tuple]] = field(default_factory=list)

    def set(self, int8: bool) -> None:
        self.layer.args = self.int8_args if int8 else self.float_args  # the value's type is the same either way
        for reader, float_args, int8_args in self.readers:
            reader.args = int8_args if int8 else float_args

    @property
    def int8(self) -> bool:
        return self.layer.args == self.int8_args


def guard(gm: fx.GraphModule, switches: dict[str, Switch], samples: list[list], expected: list[list],
          budget: float) -> dict[str, str]:
    """Put ops of ``switches`` back into float32 (see the module docstring); ``{op name: why}`` for each."""

    def error() -> float:
        program = ReferenceProgram(gm)
        return max(relative_error(program(sample), want) for sample, want in zip(samples, expected))

    total = error()
    if total <= budget:
        return {}
    for switch in switches.values():
        switch.set(False)
    sensitivity = {}
    for name, switch in switches.items():
        switch.set(True)
        sensitivity[name] = error()
        switch.set(False)
    for switch in switches.values():
        switch.set(True)
    kept: dict[str, str] = {}
    for name in sorted(sensitivity, key=sensitivity.__getitem__, reverse=True):
        switches[name].set(False)
        kept[name] = (f"kept in float32 by the accuracy guard: in int8 alone it moves the outputs by "
                      f"{sensitivity[name]:.1e} (relative, on the calibration data), the most of the ops left; with "
                      f"every op in int8 they moved {total:.1e}, over accuracy_budget={budget:g}")
        if error() <= budget:
            break
    return kept
