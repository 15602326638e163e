"""TorchScript's table of builtins, kept free of ops torch has let go.

``torch.jit.script`` takes any Python value whose ``id`` is in ``torch.jit._builtins``'s table for a builtin op.
Registering a second overload of an op (``torch.ao.quantization.fx._decomposed`` defines
``quantize_per_tensor`` twice, and so on) replaces its packet's op object and leaves the old one's ``id`` in
that table; once freed, a new object can be allocated at its address (a ``Conv2d``'s
``_reversed_padding_repeated_twice`` list), and scripting the module then fails with "builtin cannot be
used as a value" (about one ``pyrys demo`` in ten).  :func:`drop_stale_builtins` removes those entries.
"""
from __future__ import annotations

import torch
import torch.jit._builtins as builtins

_TORCH_OWN = ("aten", "prim")  # builtins of these namespaces are torch's Python functions too: never dropped


def drop_stale_builtins() -> int:
    """Remove each table entry of an op outside aten and prim whose id is not its packet's op now (the op a
    later overload replaced); returns how many."""
    table = builtins._get_builtin_table()
    stale = []
    for key, name in list(table.items()):
        namespace, _, op = name.partition("::")
        if namespace in _TORCH_OWN or not op:
            continue
        space = torch.ops.__dict__.get(namespace)
        packet = space.__dict__.get(op) if space is not None else None  # (never created here: only read)
        if packet is not None and id(getattr(packet, "_op", None)) != key:
            stale.append(key)
    for key in stale:
        table.pop(key, None)
    return len(stale)
