"""A tensor's fingerprint: a CRC-32 of at most :data:`SAMPLED` of its elements' bytes, evenly spaced.

Equal tensors (of one shape, strides and dtype) have equal fingerprints; unequal ones may too (they differ
between the samples), so a match is confirmed byte for byte (``ir/graph.py``'s ``same_bits``).  It costs
microseconds where a CRC of every byte costs about a millisecond per MB, and a released constant
(``ir/released.py``) keeps its values' fingerprint, so that a later capture's weights are matched to it
without restoring every candidate from the backend's layout (a 4-layer BERT's first new shape: 0.5 s of
share_constants, most of it restoring and CRCs).
"""
from __future__ import annotations

import zlib

import torch

SAMPLED = 1024  # elements a fingerprint reads, at most


def fingerprint(tensor: torch.Tensor) -> int | None:
    """The CRC-32 of the bytes of ``tensor``'s elements at ``SAMPLED`` evenly spaced places of its flat order
    (all of them where it has fewer); None for a tensor whose bytes cannot be read so (sparse, on ``meta``)."""
    try:
        flat = tensor.detach().reshape(-1)
        if flat.numel() > SAMPLED:
            flat = flat[torch.linspace(0, flat.numel() - 1, SAMPLED, dtype=torch.float64).long()]
        return zlib.crc32(flat.contiguous().view(torch.uint8).numpy())
    except (RuntimeError, TypeError, ValueError):
        return None
