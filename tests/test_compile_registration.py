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
