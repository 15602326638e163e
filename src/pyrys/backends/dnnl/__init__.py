"""The dnnl backend: pre-created oneDNN v3 primitives called through ctypes.

Nothing heavy happens at import; `binding.is_available()` says whether
libdnnl can be loaded, and why not.
"""
