"""``torch.compile(backend="pyrys")`` however pyrys is reached, each in a fresh process.

Dynamo loads the ``torch_dynamo_backends`` entry point itself, which imports pyrys; pyrys must
then not register the name a second time (dynamo refuses: ``duplicate name: pyrys``).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

COMPILE_AND_COMPARE = """
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    x = torch.rand(1, 3, 8, 8)
    compiled = torch.compile(model, backend="pyrys", options={"backend": "reference"})
    with torch.no_grad():
        error = ((compiled(x) - model(x)).abs().max() / model(x).abs().max()).item()
    assert error <= 1e-4, error
"""

WAYS = {
    "entry_point_alone": """
        import sys
        import torch
        assert "pyrys" not in sys.modules
        COMPILE_AND_COMPARE
        assert "pyrys" in sys.modules  # dynamo imported it through the entry point
    """,
    "import_pyrys_first": """
        import pyrys
        COMPILE_AND_COMPARE
    """,
    "dynamo_then_pyrys": """
        import torch._dynamo
        import pyrys
        COMPILE_AND_COMPARE
    """,
    "entry_point_then_import_pyrys": """
        COMPILE_AND_COMPARE
        import pyrys
        torch._dynamo.reset()
        COMPILE_AND_COMPARE
    """,
    "backends_listed_then_import_pyrys": """
        import torch
        assert "pyrys" in torch._dynamo.list_backends()
        import pyrys
        COMPILE_AND_COMPARE
    """,
}


def program(way: str) -> str:
    body = textwrap.dedent(COMPILE_AND_COMPARE)
    return "\n".join(body if line.strip() == "COMPILE_AND_COMPARE" else line.strip()
                     for line in WAYS[way].splitlines())


@pytest.mark.parametrize("way", WAYS)
def test_torch_compile_finds_pyrys(way, tmp_path):
    result = subprocess.run([sys.executable, "-c", program(way)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


HELD_UNTIL_EXIT = """
import torch, pyrys
x = torch.randn(2, 8)
class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = pyrys.optimize(torch.nn.Linear(8, 8).eval(), (x,))
        self.linear = torch.nn.Linear(8, 8)
    def forward(self, x):
        return self.linear(x) + self.inner(x)
compiled = torch.compile(Outer().eval(), backend="pyrys")
with torch.no_grad():
    compiled(x), compiled(x)
"""


def test_an_optimized_module_alive_at_exit_goes_quietly(tmp_path):
    """A helper's find: freed at the interpreter's exit, after pyrys.machine's globals, its ``__del__`` printed
    "Exception ignored in ... TypeError: 'NoneType' object is not callable"."""
    result = subprocess.run([sys.executable, "-c", HELD_UNTIL_EXIT], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "Exception ignored" not in result.stderr, result.stderr[-3000:]
