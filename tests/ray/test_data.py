"""Ray Data batch inference with :class:`pyrys.ray.Predictor` on a local Ray runtime: every row's outputs
agree with eager, on actors that each load the saved program once.

Runs in a child process (``ray.init`` sets the driver's signal handlers); needs the ``ray`` extra."""
from __future__ import annotations

import pytest

import pyrys
from tests.caller_helpers import run_isolated
from tests.ray.models import images, two_heads

pytest.importorskip("ray.data", reason="pyrys.ray.Predictor runs on Ray Data: pip install 'pyrys[ray]'")


def _map_dataset(path: str) -> None:
    """Map 37 rows in batches of 8 (the last one short) on two actors, which get the program's files
    with their constructor's arguments (no shared file system needed); compare with eager."""
    import numpy as np
    import ray
    import torch

    from pyrys.ray import Predictor
    from pyrys.saving import read_files
    from tests.conftest import TOLERANCE

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        x = images(37, seed=7).numpy()
        ds = ray.data.from_items([{"image": row, "id": i} for i, row in enumerate(x)], override_num_blocks=4)
        mapped = ds.map_batches(Predictor, fn_constructor_args=(read_files(path),),
                                fn_constructor_kwargs={"output_column": ["logits", "features"], "threads": 1},
                                batch_size=8, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
        rows = sorted(mapped.take_all(), key=lambda row: row["id"])
    finally:
        ray.shutdown()
    assert [row["id"] for row in rows] == list(range(37))
    with torch.no_grad():
        logits, rest = two_heads()(torch.from_numpy(x))
    got = torch.from_numpy(np.stack([row["logits"] for row in rows]))
    assert pyrys.relative_error(got, logits) <= TOLERANCE
    got = torch.from_numpy(np.stack([row["features"] for row in rows]))
    assert pyrys.relative_error(got, rest["features"]) <= TOLERANCE


def test_map_batches_with_the_predictor_matches_eager(tmp_path):
    path = pyrys.save(pyrys.optimize(two_heads(), (images(2, 0),), dynamic=True), tmp_path / "two_heads.pyrys")
    run_isolated(_map_dataset, str(path), timeout=300)
