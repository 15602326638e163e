"""The README says what the code does: the places where it lists what code defines."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pyrys
from pyrys.passes.pipeline import PIPELINE

README = (Path(__file__).parents[1] / "README.md").read_text()


def _table_after(heading_line: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after the line that starts with ``heading_line``."""
    lines = README[README.index(heading_line):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_the_pass_table_lists_the_pipeline_in_order():
    listed = [name for row in _table_after("The passes, in order") for name in re.findall(r"`(\w+)`", row[0])]
    assert listed == [p.name for p in PIPELINE]


def test_the_options_table_lists_every_keyword_option_of_optimize():
    listed = {name for row in _table_after("Options of `pyrys.optimize`") for name in re.findall(r"`(\w+)=", row[0])}
    keywords = {name for name, p in inspect.signature(pyrys.optimize).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords <= listed
