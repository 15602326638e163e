"""argparse types the commands share (``pyrys serve``, ``pyrys bench``): a value out of range is refused by
argparse, naming the option, before anything runs."""
from __future__ import annotations

import argparse
import math


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # NaN and infinity too (a serve batch that waits for ever)
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value
