"""Saving and loading compiled modules: ``pyrys.save(opt, path)``, ``pyrys.load(path)`` (no pickle)."""
from pyrys.saving.directory import read_files
from pyrys.saving.program import load, save

__all__ = ["save", "load", "read_files"]
