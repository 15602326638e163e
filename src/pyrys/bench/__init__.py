"""``pyrys bench``: interleaved benchmarks of pyrys against eager and its peers.

Modules: ``peers`` (one class per system), ``measure`` (interleaved timing, compile
time, memory, error), ``roofline`` (machine peaks, model FLOPs), ``report`` (table,
CSV, JSON, chart), ``models`` (model zoo: ``pyrys.testing``'s random weights and BatchNorm) and ``cli``
(``add_arguments`` and ``run`` for the ``pyrys bench`` subcommand).
"""
