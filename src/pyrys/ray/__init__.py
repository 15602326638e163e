"""pyrys on Ray: ``pyrys serve PATH`` (Ray Serve, :mod:`pyrys.ray.serve_cli`) and
:class:`Predictor` for Ray Data's ``map_batches``, both from a program ``pyrys.save`` wrote.

Needs the ``ray`` extra (``pip install 'pyrys[ray]'``) to run on Ray; :class:`Predictor` itself
is plain Python and imports without it.
"""
from pyrys.ray.predictor import Predictor

__all__ = ["Predictor"]
