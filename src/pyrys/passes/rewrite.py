"""Rewrite rules as data: pattern + check + rewrite, with a reason for every miss.

A rule is anchored on a node (``anchors``: the op targets it looks at).  ``match``
returns a :class:`Match` with the bindings the rewrite needs, a :class:`Miss` when
the pattern is there but a condition fails (the reason is shown by ``pyrys explain``),
or ``None`` when the node is not this rule's pattern at all.

    rules = FOLD_BATCH_NORM_RULES + POST_OP_RULES      # rule sets are tuples
    result = apply_rules(gm, rules)                    # result.fired["conv_bn"] == 3
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from pyrys.ir.vocabulary import single_user


@dataclass
class Match:
    """A successful match: ``bindings`` holds what ``rewrite`` needs."""

    bindings: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]


@dataclass(frozen=True)
class Miss:
    """A place where a rule's pattern was found but it could not apply, and why."""

    rule: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} at %{self.node}: {self.reason}"


def fail(reason: str) -> Miss:
    """A rule's check failed: ``return fail("weight is not constant")``. Filled in by :func:`apply_rules`."""
    return Miss("", "", reason)


def shared_miss(node: fx.Node, consequence: str, subject: str | None = None) -> Miss | None:
    """Why a rewrite cannot consume ``node``'s value: something else reads it too (None if nothing does).

        shared_miss(conv, "its weights cannot change")
        -> fail("the output of %conv has 2 users, so its weights cannot change")
    """
    if single_user(node):
        return None
    return fail(f"{subject or f'the output of %{node.name}'} has {len(node.users)} users, so {consequence}")


class Rule:
    """Base class: set ``name`` and ``anchors``; implement ``match`` and ``rewrite``."""

    name: str = ""
    anchors: frozenset = frozenset()

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        raise NotImplementedError


@dataclass
class PassResult:
    """What a pass did: how often each rule fired, and the misses with their reasons."""

    fired: Counter = field(default_factory=Counter)
    misses: list[Miss] = field(default_factory=list)


def apply_rules(gm: fx.GraphModule, rules: tuple[Rule, ...]) -> PassResult:
    """One sweep over the graph in order; each node is offered to the rules anchored on its target."""
    result = PassResult()
    for node in list(gm.graph.nodes):
        if node._erased or node.op != "call_function":
            continue  # erased by an earlier rewrite in this sweep
        for rule in rules:
            if node.target in rule.anchors and _try_rule(gm, node, rule, result):
                break
    gm.graph.lint()
    gm.recompile()
    return result


def _try_rule(gm: fx.GraphModule, node: fx.Node, rule: Rule, result: PassResult) -> bool:
    outcome = rule.match(gm, node)
    if isinstance(outcome, Miss):
        result.misses.append(Miss(rule.name, node.name, outcome.reason))
        return False
    if outcome is None:
        return False
    rule.rewrite(gm, node, outcome)
    result.fired[rule.name] += 1
    return True
