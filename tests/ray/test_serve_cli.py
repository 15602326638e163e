"""``pyrys serve``'s refusals before Ray starts: no Ray, not a save, a port in use, bad numbers."""
from __future__ import annotations

import socket
import sys

import pytest

from pyrys.cli import build_parser, main


def test_without_ray_it_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["serve", str(tmp_path)]) == 2
    assert "pip install 'pyrys[ray]'" in capsys.readouterr().err


def test_a_directory_that_is_not_a_save_is_refused_before_ray_starts(tmp_path, capsys):
    pytest.importorskip("ray.serve", reason="pyrys serve runs on Ray Serve: pip install 'pyrys[ray]'")
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "pyrys serve:" in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_ray_starts(tmp_path, capsys):
    pytest.importorskip("ray.serve", reason="pyrys serve runs on Ray Serve: pip install 'pyrys[ray]'")
    import torch

    import pyrys

    path = pyrys.save(pyrys.optimize(torch.nn.Linear(3, 2).eval(), (torch.ones(1, 3),)), tmp_path / "linear.pyrys")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(path), "--port", str(taken.getsockname()[1])]) == 2
    assert "pass --port another port" in capsys.readouterr().err
    assert main(["serve", str(path), "--host", "nosuch.invalid"]) == 2  # said to pass another port
    assert "'nosuch.invalid' is no address of this machine" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--replicas", "0"], ["--max-batch", "0"], ["--batch-wait-ms", "-1"],
                                    ["--threads", "0"], ["--port", "99999"],
                                    # a helper's fuzz: a lone request waited for ever; Ray started with 5000 CPUs
                                    # and every replica failed; port 0 bound one the ready line did not name
                                    ["--batch-wait-ms", "inf"], ["--batch-wait-ms", "nan"], ["--threads", "5000"],
                                    ["--port", "0"]])
def test_numbers_out_of_range_are_refused_by_name(option, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "x", *option])
    assert option[0] in capsys.readouterr().err


def test_the_note_on_requests_that_cannot_batch_says_why(tmp_path):
    """A BERT optimized with dynamic=True was told to optimize with dynamic=True: its inputs' dims 0 are separate
    symbols in the graph (a helper's find)."""
    import argparse

    import torch

    import pyrys
    from pyrys.ray.serve_cli import _notes

    class Apart(torch.nn.Module):
        def forward(self, ids, mask):
            return ids * 2, mask + 1

    args, two = argparse.Namespace(replicas=1, max_batch=8), (torch.ones(2, 3), torch.ones(2, 3))
    apart = pyrys.load(pyrys.save(pyrys.optimize(Apart(), two, dynamic=True), tmp_path / "apart"))
    fixed = pyrys.load(pyrys.save(pyrys.optimize(Apart(), two), tmp_path / "fixed"))
    (note,) = _notes(apart, args, 1, 2, cluster=False)
    assert "the inputs' dims 0 are separate symbols in the captured graph" in note and "dynamic=True" not in note
    (note,) = _notes(fixed, args, 1, 2, cluster=False)
    assert "saved for fixed shapes: optimize it with dynamic=True" in note
