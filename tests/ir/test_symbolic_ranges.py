"""The ranges a graph with symbolic sizes keeps (``pyrys.ir.symbolic.set_ranges``)."""
import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.numbers import int_oo

from pyrys.ir.symbolic import RANGES_KEY, set_ranges


def test_a_float_symbol_s_range_is_left_out_and_the_sizes_kept():
    """A helper's find: torch.export's range constraints of a YOLO head held float symbols (``zuf0``: ``(-oo, oo)``),
    ``int(-oo)`` raised, and the capture with symbolic sizes was given up (every batch a capture of its own)."""
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    size, other, float_symbol = sympy.Symbol("s77", integer=True), sympy.Symbol("s3", integer=True), sympy.Symbol("zuf0")
    set_ranges(gm, {size: (0, int_oo), other: (2, 64), float_symbol: (-sympy.oo, sympy.oo)})
    assert gm.meta[RANGES_KEY] == {size: (0, None), other: (2, 64)}
