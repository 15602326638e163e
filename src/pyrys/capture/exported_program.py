"""Take a user's ``torch.export.ExportedProgram`` as it is (it is not exported again).

The program is functionalized (``run_decompositions({})`` returns a new program; the
user's is untouched) and turned into pyrys IR by :func:`pyrys.capture.export.from_exported`.
Buffers are copied: a BatchNorm left in training form updates its running statistics
in place, and those must not be the tensors the user's program holds.
"""
from __future__ import annotations

import re
import weakref

import sympy
import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_flatten, tree_flatten_with_path
from torch.utils._sympy.numbers import int_oo

from pyrys.capture.captured import Captured
from pyrys.capture.export import from_exported, tracing
from pyrys.errors import CaptureError
from pyrys.ir.graph import state_inputs, state_ref
from pyrys.ir.symbolic import is_symbolic, ranges_of, unhold_size_guards
from pyrys.signature import InputError


def capture_exported(ep: ExportedProgram) -> Captured:
    held = set(_guards(ep, as_first_seen=True))
    try:
        with tracing(), torch.no_grad():
            functional = ep.run_decompositions({})
    except (AssertionError, RuntimeError) as error:  # torch cannot functionalize it (an input written in place
        raise CaptureError(  # through another it aliases, say)
            "pyrys: torch cannot functionalize this ExportedProgram (ep.run_decompositions({}) fails: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}); pass the nn.Module, or export it "
            "again (with example inputs in separate memory where one tensor was passed twice) and pass that program "
            "as torch.export.export returns it (one read back by torch.export.load with a derived dim such as "
            "2 * Dim fails so)") from error
    captured = from_exported(functional, None)
    if is_symbolic(captured.gm):
        unhold_size_guards(captured.gm, [g for g in _guards(functional) if g not in held], ranges_of(captured.gm),
                           _sizes_excluded(ep))
    for node in state_inputs(captured.gm.graph):
        ref = state_ref(node)
        if isinstance(ref.value, torch.Tensor):
            ref.value = ref.value.detach().clone()
    return captured


def _guards(ep: ExportedProgram, as_first_seen: bool = False) -> list[sympy.Basic]:
    """The guards of the shape env ``ep``'s symbolic sizes belong to (none without one); ``as_first_seen``:
    those it held when pyrys first read it (``run_decompositions`` adds its retrace's to that same env, so a
    second ``optimize`` of one program would take the first's as the program's own)."""
    try:
        mode = detect_fake_mode([node.meta.get("val") for node in ep.graph.find_nodes(op="placeholder")])
    except AssertionError:  # values of several fake modes: none to read guards from
        return []
    env = mode.shape_env if mode is not None else None
    if env is None:
        return []
    count = _FIRST_SEEN.setdefault(env, len(env.guards)) if as_first_seen else len(env.guards)
    return [guard.expr for guard in env.guards[:count]]


_FIRST_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # shape env -> its guards when first read


_EXCLUDED_SIZE = re.compile(r"\.size\(\)\[\d+\] != (\d+)")


def _sizes_excluded(ep: ExportedProgram) -> frozenset[int] | None:
    """The sizes ``ep``'s own guards exclude from some input dim (``L['x'].size()[0] != 3``: a branch on the
    batch, which ``torch.export.load`` keeps as text; its shape env then holds none), or None where it records
    no guards so."""
    code = getattr(ep, "_guards_code", None)
    if code is None:
        return None
    return frozenset(int(size) for line in code for size in _EXCLUDED_SIZE.findall(str(line)))


def exported_example_inputs(ep: ExportedProgram) -> tuple[tuple, dict]:
    """The example inputs recorded in ``ep`` (present when it was made by ``torch.export.export``)."""
    recorded = getattr(ep, "example_inputs", None)
    if recorded is None:
        raise ValueError("pyrys.optimize needs example_inputs for this ExportedProgram: it records none "
                         "(pass example_inputs=(x,) with the shapes it was exported for)")
    args, kwargs = recorded
    return tuple(args), dict(kwargs)


def exported_inputs(ep: ExportedProgram, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` checked against the inputs ``ep`` was exported for, the keywords in its order (a
    program binds its inputs in the order they come: ``{"c": c, "b": b}`` for an export of ``b=, c=`` would
    swap them).  ``InputError`` for another structure, another size of a dim it holds fixed, a size outside
    a ``Dim``'s range (0 and 1 too, which torch's own check lets through), or another dtype: the graph is
    never run on inputs it was not traced for."""
    spec = ep.call_spec.in_spec
    try:
        names = list(spec.child(1).context) if spec is not None else list(kwargs)
        if sorted(kwargs) != sorted(names):
            raise ValueError(f"keyword inputs {sorted(kwargs)}, exported with {names}")
        kwargs = {name: kwargs[name] for name in names}
        flat, given = tree_flatten((tuple(args), kwargs))
        if spec is not None and given != spec:
            raise ValueError(f"inputs structured as {given}, exported as {spec}")
        torch_check = getattr(ep, "_check_input_constraints", None)  # a private method: used where it is there
        if torch_check is not None:
            torch_check(tree_flatten_with_path((tuple(args), kwargs))[0])
        placeholders = [node for node, input_spec in zip(ep.graph.find_nodes(op="placeholder"),
                                                         ep.graph_signature.input_specs)
                        if input_spec.kind is InputKind.USER_INPUT]
        for position, (value, node) in enumerate(zip(flat, placeholders)):
            _check_input(position, value, node.meta.get("val"), ep.range_constraints)
    except (RuntimeError, ValueError, TypeError, AssertionError) as error:
        why = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"pyrys.optimize: the example inputs do not fit this ExportedProgram ({why}). Pass inputs "
                         "like those it was exported with (shapes, dtypes), or export it with dynamic_shapes= "
                         "(torch.export.Dim) for the sizes that vary") from None
    return tuple(args), kwargs


def _check_input(position: int, value: object, val: object, ranges: dict) -> None:
    """Input ``position`` (``value``) against its placeholder's ``val``: its dtype, and its sizes within the
    ranges of the symbols they are (torch's check reads shapes only, and lets 0 and 1 through)."""
    if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor):
        return
    if val.dtype != value.dtype:
        raise TypeError(f"input {position} is {value.dtype}, exported as {val.dtype}")
    for i, (dim, size) in enumerate(zip(val.shape, value.shape)):
        bounds = ranges.get(dim.node.expr) if isinstance(dim, torch.SymInt) else None
        if bounds is None:
            continue
        upper = None if bounds.upper in (int_oo, sympy.oo) else int(bounds.upper)
        if size < int(bounds.lower) or (upper is not None and size > upper):
            raise ValueError(f"input {position} dim {i} is {size}, outside its range [{bounds.lower}, {upper}]")
