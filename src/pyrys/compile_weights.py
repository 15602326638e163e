"""The parameters and buffers a ``torch.compile`` graph is called with, and the programs made from each set.

Dynamo passes a module's parameters and buffers to its graph as inputs at every call, and one graph serves
every instance of a class (two models of one architecture share it).  pyrys freezes them into its programs,
so a graph keeps its programs per set of state tensors (told apart by identity, held by weak reference: a
set whose model is gone is dropped with its programs; at most :data:`MAX_SETS`, the least recently called
dropped first, so that each layer of a model compiled layer by layer keeps its own), and compiles a set
again where one of its tensors was written in place since (its version counter moved; an optimizer step,
``load_state_dict``, ``copy_``; a fused optimizer's step, which moves none, is noted by a hook on every
optimizer's steps) or replaced: eager reads them at every call.  Where they change at nearly
every call of theirs (more than :data:`MAX_CHANGES` times, each fewer than :data:`MIN_CALLS_APART` of its
calls after the last; or, in the graph's calls, tensors replaced as often, or sets dropped for room coming
back as often: more instances take turns than are kept) the graph runs in torch.  The check costs about 30 us
a call for ResNet-50's 320 tensors.  ``p.data = t`` is seen by the address it moves (``vector_to_parameters``
and ``module.bfloat16().float()`` do it).  Not seen: writes through ``p.data`` (no version of ``p``'s moves)
and in-place writes to tensors made under ``torch.inference_mode()`` (they have no version counter).

BatchNorm's statistics, written by a train-mode graph that runs in torch, get no new version either (and a
new one would break autograd's check of the tensors it saved): such a graph notes the tensors it wrote
(:func:`note_state_written`), and a set holding one compiles again at its next call.
"""
from __future__ import annotations

import logging
import operator
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from pyrys.shape_cache import ShapeCache

LOG = logging.getLogger("pyrys")
MAX_SETS = 64  # sets of state tensors (model instances, layers of one class) a graph keeps programs for
MAX_CHANGES = 4  # changes fewer than MIN_CALLS_APART calls apart before torch runs the graph
MIN_CALLS_APART = 16  # a change this many calls or more after the last one (an evaluation between epochs) is free
_WRITES = [0]  # writes of state that move no version counter, process-wide (note_state_written)
_WRITTEN_AT: dict[int, int] = {}  # id of a tensor so written -> the count of the write that wrote it last
_VERSION = operator.attrgetter("_version")
_ADDRESS = operator.methodcaller("data_ptr")


def note_state_written(tensors: list[torch.Tensor]) -> None:
    """A graph that runs in torch wrote these (BatchNorm's statistics in training) without new versions."""
    _WRITES[0] += 1
    if len(_WRITTEN_AT) > 100_000:  # ids of tensors long gone: a set holding none of them misses nothing
        _WRITTEN_AT.clear()
    _WRITTEN_AT.update(dict.fromkeys(map(id, tensors), _WRITES[0]))


def _note_fused_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """A fused optimizer's step (``fused=True``: Adam, AdamW, SGD, Adagrad) writes its parameters without
    moving their versions: noted as such writes (a compiled model kept serving the weights it froze)."""
    fused = [group for group in optimizer.param_groups if group.get("fused")]
    if fused:
        note_state_written([p for group in fused for p in group["params"]])


register_optimizer_step_post_hook(_note_fused_step)  # every optimizer's step, process-wide


def _gatherer(positions: list[int]) -> Callable[[tuple], tuple]:
    """``args -> tuple(args[i] for i in positions)``, as fast as Python does it."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    return lambda args: tuple(args[i] for i in positions)


@dataclass
class Churn:
    """How often something changed in the calls that saw it: ``changed_soon`` counts a change, and says whether
    there were more than :data:`MAX_CHANGES`, each fewer than :data:`MIN_CALLS_APART` calls after the one
    before (calls counted roughly: threads may race; a rate, not a total)."""

    calls: int = 0
    last_change: int = 0
    changes: int = 0

    def changed_soon(self) -> bool:
        self.changes += self.calls - self.last_change < MIN_CALLS_APART
        self.last_change = self.calls
        return self.changes > MAX_CHANGES


@dataclass
class WeightSet:
    """One set of state tensors: their paths by position; the tensors (weak references) as frozen and their
    versions; the programs compiled from them (by input signature; None until the first)."""

    paths: dict[int, str]
    held: tuple  # a weakref.ref of each tensor
    versioned: bool  # every tensor has a version counter (none made under inference_mode)
    versions: list
    writes_seen: int  # _WRITES when this set last looked for its tensors among those written
    shapes: ShapeCache | None = field(default=None)
    churn: Churn = field(default_factory=Churn)  # its tensors' changes, in its own calls (a model's other
    # layers of the class, updated by the same optimizer step, are not this one's changes)

    @classmethod
    def of(cls, paths: dict[int, str], tensors: tuple) -> "WeightSet":
        versioned = not any(tensor.is_inference() for tensor in tensors)
        made = cls(paths, tuple(map(weakref.ref, tensors)), versioned, [], 0)
        made.refreeze(tensors)
        return made

    def state(self, args: tuple) -> dict[int, tuple[str, torch.Tensor]]:
        """By position, the path and tensor of each of this set's tensors in a call's ``args``."""
        return {i: (path, args[i]) for i, path in self.paths.items()}

    def alive(self) -> bool:
        """Whether every tensor of the set still exists (a model deleted: its set is of no use)."""
        return all(ref() is not None for ref in self.held)  # `None in`: Tensor.__eq__ on each, 500x slower

    def _versions(self, tensors: tuple) -> list:
        """Each tensor's version and address (``p.data = t`` moves the address alone: ``vector_to_parameters``,
        ``module.bfloat16().float()``)."""
        if self.versioned:
            return list(zip(map(_VERSION, tensors), map(_ADDRESS, tensors)))
        return [(None if tensor.is_inference() else tensor._version, tensor.data_ptr()) for tensor in tensors]

    def unchanged(self, tensors: tuple) -> bool:
        """Whether ``tensors`` are the ones frozen, unwritten since (by a write that moves a version, or one
        noted by :func:`note_state_written`)."""
        if not (all(map(operator.is_, tensors, map(operator.call, self.held))) and
                self._versions(tensors) == self.versions):
            return False
        writes = _WRITES[0]
        if writes != self.writes_seen:
            if any(_WRITTEN_AT.get(id(tensor), 0) > self.writes_seen for tensor in tensors):
                return False
            self.writes_seen = writes
        return True

    def refreeze(self, tensors: tuple) -> None:
        """Take ``tensors`` (these very ones) as frozen now, the programs from before dropped."""
        self.versions, self.writes_seen, self.shapes = self._versions(tensors), _WRITES[0], None


class WeightSets:
    """The :class:`WeightSet` of each call (``of``), made, kept and compiled again as the module docstring says."""

    def __init__(self, paths: dict[int, str], lock: threading.Lock):
        self.paths, self._lock = paths, lock
        self._gather = _gatherer(list(paths))
        self._sets: OrderedDict[tuple[int, ...], WeightSet] = OrderedDict()  # least recently called first
        self._dropped: OrderedDict[tuple[int, ...], WeightSet] = OrderedDict()  # sets dropped for room, the last
        self._last: WeightSet | None = None  # the set of the last call: the first looked at
        self.returns = Churn()  # sets dropped for room that came back, in the graph's calls

    @property
    def changes(self) -> int:
        """Changes that came soon after the one before: of any set's tensors, or sets coming back."""
        return self.returns.changes + sum(weights.churn.changes for weights in list(self._sets.values()))

    def of(self, args: tuple) -> WeightSet | None:
        """The set ``args`` carry, its programs dropped where its tensors changed; None past
        :data:`MAX_CHANGES` changes in quick succession (of one set's tensors, or of sets taking turns)."""
        self.returns.calls += 1
        tensors = self._gather(args)
        last = self._last
        if last is not None and last.unchanged(tensors):
            last.churn.calls += 1
            return last
        key = tuple(map(id, tensors))
        with self._lock:
            found = self._sets.get(key)
            if found is not None and not found.alive():  # ids of tensors gone, taken by new ones
                del self._sets[key]
                found = None
            if found is None:
                dropped = self._dropped.pop(key, None)  # alive: the same tensors (not new ones on old ids)
                if dropped is not None and dropped.alive() and self.returns.changed_soon():  # more take turns
                    return None  # than are kept
                replaced = dropped is None and any(not weights.alive() for weights in self._sets.values())
                if replaced and self.returns.changed_soon():  # a tensor replaced (``p = nn.Parameter(...)``), its
                    return None  # set gone with the old one: a change of the graph's, as often as a write
                found = self._sets[key] = WeightSet.of(self.paths, tensors)
                self._make_room()
            elif not found.unchanged(tensors):
                if found.churn.changed_soon():
                    return None
                LOG.info("pyrys (torch.compile): parameters or buffers changed since compiling: compiling again")
                found.refreeze(tensors)
            found.churn.calls += 1
            self._sets.move_to_end(key)
            self._last = found
            return found

    def _make_room(self) -> None:
        """Drop the sets whose model is gone, then the least recently called past :data:`MAX_SETS`."""
        for key in [key for key, weights in self._sets.items() if not weights.alive()]:
            del self._sets[key]
        while len(self._sets) > MAX_SETS:
            key, weights = self._sets.popitem(last=False)
            weights.shapes = None  # its programs go; the set stays to tell its tensors come back
            self._dropped[key] = weights
        while len(self._dropped) > 4 * MAX_SETS:
            self._dropped.popitem(last=False)

    def programs(self) -> dict:
        """Every set's programs, by (the set's place, input signature)."""
        return {(n, key): program for n, weights in enumerate(list(self._sets.values()))
                for shapes in [weights.shapes] if shapes is not None for key, program in shapes.entries.items()}
