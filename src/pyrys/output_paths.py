"""Whether a command can write where it is told to, found before its run rather than after it (a benchmark's
results lost to a folder that cannot be made)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable_file(name: str | os.PathLike) -> str:
    """Why a file cannot be written at ``name``, or "": empty, a folder there, or a folder to hold it that is
    missing, is a file, or takes no new file (tried)."""
    if not os.fspath(name):
        return "it is empty"
    path = Path(name)
    if path.is_dir():
        return "it is a folder"
    return _unwritable_folder(path.parent, make=False)


def unwritable_folder(name: str | os.PathLike) -> str:
    """Why the folder ``name`` cannot take files, or "" (it is made, with its parents, where missing)."""
    if not os.fspath(name):
        return "it is empty"
    path = Path(name)
    if path.exists() and not path.is_dir():
        return "it is a file, not a folder"
    return _unwritable_folder(path, make=True)


def _unwritable_folder(folder: Path, make: bool) -> str:
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"{above} is a file, not a folder"
    if not folder.is_dir():
        if not make:
            return f"its folder {folder} does not exist"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"the folder cannot be made ({error.strerror or error})"
    try:
        with tempfile.TemporaryFile(dir=folder):
            return ""
    except OSError as error:
        return f"{folder} takes no new file ({error.strerror or error})"
