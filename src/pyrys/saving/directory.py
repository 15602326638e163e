"""The saved directory: written whole or not at all, read only if whole, of a known format.

    path/
      manifest.json          {"format": "pyrys-program", "format_version": 2, "pyrys": ..., "torch": ...,
                              "onednn": ..., "cpu": ..., "isa": [...], "files": {name: sha256}}
      program.json           the program (graphs, decisions, history)
      tensors.safetensors    every tensor, by key

``write_directory`` writes into a fresh sibling directory and renames it into place, so an
interrupted save leaves no half-written ``path``; an existing ``path`` is replaced only if
it is a pyrys save.  The sibling's name holds the host and process that write it
(``.NAME.saving@HOST@PID-XXXX``, a long NAME cut; a host name holds no ``@``), so the next save to ``path`` removes
what a save killed on this host left, once it is ``STALE_AFTER_S`` old.  ``read_directory`` checks the format, its version and every file's
SHA-256 before anything is parsed, so a truncated or edited save is refused by name.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pyrys.errors import LoadError, SaveError

FORMAT = "pyrys-program"
FORMAT_VERSION = 2  # 2: forward's defaults saved as values (saving/tree_spec.py), which 1 read as none
MANIFEST, PROGRAM, TENSORS = "manifest.json", "program.json", "tensors.safetensors"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(data: bytes | str) -> Any:
    """``json.loads``; JSON nested too deep to parse (a RecursionError) is a ValueError, as other bad JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested deeper than Python's parser reads") from None


def is_pyrys_save(path: Path) -> bool:
    """Whether ``path`` is a directory holding a pyrys manifest."""
    try:
        return _json((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_directory(path: str | os.PathLike, program: dict, tensors: dict[str, torch.Tensor], about: dict) -> Path:
    """Write ``program`` (JSON), ``tensors`` and a manifest (``about`` plus format and hashes) to ``path``
    (a symbolic link: to the save it points to, which the link keeps naming)."""
    try:
        path = _through_link(path)
    except (OSError, RuntimeError) as error:  # a loop of links
        raise SaveError(f"pyrys.save: cannot write {path}: {error}") from None
    files = {PROGRAM: json.dumps(program, indent=1).encode(), TENSORS: save_tensors(tensors)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **about,
                "files": {name: _sha256(data) for name, data in files.items()}}
    files[MANIFEST] = json.dumps(manifest, indent=1).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _directory_lock(path.parent, exclusive=True):
            _refuse_what_is_not_a_save(path)
            _remove_what_killed_saves_left(path)
        staging = _new_directory(path.parent, _sibling_prefix(path, "saving"))
    except (OSError, ValueError) as error:  # (ValueError: a NUL in the path)
        raise SaveError(f"pyrys.save: cannot write in {path.parent}: {error}") from None
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        with _directory_lock(path.parent, exclusive=True):  # saves to one path take turns; loads wait for it
            _refuse_what_is_not_a_save(path)
            _replace(staging, path)
    except OSError as error:
        raise SaveError(f"pyrys.save: cannot write {path}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _new_directory(parent: Path, prefix: str) -> Path:
    """A new directory ``prefix`` + 8 random letters in ``parent``, with the mode the umask gives a directory (a
    save is read by other accounts: ``tempfile.mkdtemp``'s 0700 kept a serving user out; a helper's find)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{os.urandom(6).hex()[:8]}"
        try:
            os.mkdir(candidate, 0o777)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {prefix}* in {parent}")


def _refuse_what_is_not_a_save(path: Path) -> None:
    if path.exists() and not is_pyrys_save(path):
        raise SaveError(f"pyrys.save: {path} exists and is not a pyrys save; pyrys replaces only its own saves")


@contextlib.contextmanager
def _directory_lock(directory: Path, exclusive: bool):
    """``flock`` on ``directory``: a save's replace holds it exclusively, a load's read shared, so that a load
    never reads a save half replaced (the old one moved aside, the new one not yet in) and saves to one path
    from several threads or processes take turns. Where the file system has no flock, nothing is held."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            pass
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _replace(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``; an existing save is moved aside first and removed after."""
    if not path.exists():
        os.rename(staging, path)
        return
    retired = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path, "old"), dir=path.parent))
    os.rename(path, retired / "save")
    try:
        os.rename(staging, path)
    except OSError:
        os.rename(retired / "save", path)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


STALE_AFTER_S = 600  # a sibling this old whose process is gone is what a killed save left


NAME_MAX = 255  # bytes of a file name on Linux and macOS file systems


def _sibling_base(path: Path, kind: str) -> str:
    """``.NAME.KIND@HOST@``, with a NAME too long to leave room for the pid and ``mkdtemp``'s 8 letters (a
    229-byte save name failed with 'File name too long') cut and given a digest of the whole."""
    host = socket.gethostname()
    room = NAME_MAX - len(os.fsencode(f"..{kind}@{host}@")) - len("4294967295-") - 8
    name = path.name
    if len(os.fsencode(name)) > room:  # (bytes as the file system has them: a Latin-1 name too)
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        name = os.fsencode(name)[:max(room - 17, 0)].decode(errors="ignore") + "~" + digest
    return f".{name}.{kind}@{host}@"


def _sibling_prefix(path: Path, kind: str) -> str:
    return f"{_sibling_base(path, kind)}{os.getpid()}-"


def _remove_what_killed_saves_left(path: Path) -> None:
    """Remove the siblings of saves to ``path`` whose process (on this host) is gone; a previous save a killed
    one had moved aside (``.old-``) is put back where nothing replaced it."""
    for kind in ("old", "saving"):
        base = _sibling_base(path, kind)
        for sibling in path.parent.glob(f"{glob.escape(base)}*"):
            pid = sibling.name[len(base):].split("-", 1)[0]
            try:
                if not pid.isdigit() or _alive(int(pid)) or time.time() - sibling.stat().st_mtime < STALE_AFTER_S:
                    continue
                if kind == "old" and (sibling / "save").is_dir() and not path.exists():
                    os.rename(sibling / "save", path)
            except OSError:  # another save cleaning it up at once
                continue
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_directory(path: str | os.PathLike) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(manifest, program, tensors)`` of a whole save of a format this pyrys reads; else :class:`LoadError`."""
    return parse_files(read_files(path), str(path))


def read_files(path: str | os.PathLike) -> dict[str, bytes]:
    """A save's files, by name, as bytes (what :func:`parse_files` and ``pyrys.load`` take): a program
    kept in memory or sent elsewhere (Ray's object store) without a shared file system."""
    try:
        path = _through_link(path)
    except (OSError, RuntimeError) as error:  # a loop of links
        raise LoadError(f"pyrys.load: cannot read {path}: {error}") from None
    with _directory_lock(path.parent, exclusive=False):  # a save's replace is never seen half done
        return _read_files(path)


def _through_link(path: str | os.PathLike) -> Path:
    """``path``, or where it points if it is a symbolic link: saves and loads take turns in the folder of the
    save itself (renamed into place, a link would become the new save beside the old one)."""
    path = Path(path)
    return path.resolve(strict=False) if path.is_symlink() else path


def _read_files(path: Path) -> dict[str, bytes]:
    if not path.is_dir():
        raise LoadError(f"pyrys.load: {path} is not a directory (pyrys.save writes a directory)")
    try:
        files = {MANIFEST: (path / MANIFEST).read_bytes()}
    except OSError:
        raise LoadError(f"pyrys.load: {path} is not a pyrys save: it has no {MANIFEST}") from None
    for name in (PROGRAM, TENSORS):
        try:
            files[name] = (path / name).read_bytes()
        except OSError as error:
            raise LoadError(f"pyrys.load: {path} is incomplete: cannot read {name} ({error.strerror})") from None
    return files


def parse_files(files: dict[str, bytes], where: str) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(manifest, program, tensors)`` from a save's files (``where`` names them in errors), each file's
    SHA-256 checked against the manifest before anything else is parsed.  A file may be any bytes-like object
    (``bytearray``, ``memoryview``: what a transport hands over)."""
    files = {name: bytes(data) if isinstance(data, (bytearray, memoryview)) else data for name, data in files.items()}
    not_bytes = sorted(name for name in (MANIFEST, PROGRAM, TENSORS)
                       if name in files and not isinstance(files[name], bytes))
    if not_bytes:
        raise LoadError(f"pyrys.load: {where}: {not_bytes[0]} is a {type(files[not_bytes[0]]).__name__}, not bytes; "
                        "pass each file's bytes as read (bytes, bytearray or memoryview), not decoded text")
    manifest = _parse_manifest(files.get(MANIFEST), where)
    for name in (PROGRAM, TENSORS):
        if not isinstance(files.get(name), bytes):
            raise LoadError(f"pyrys.load: {where} is incomplete: it has no {name}")
        if _sha256(files[name]) != manifest["files"].get(name):
            raise LoadError(f"pyrys.load: {where}: {name} was changed or truncated after it was saved "
                            "(its SHA-256 is not the one the manifest records); save the model again")
    try:
        program = _json(files[PROGRAM])
        tensors = load_tensors(files[TENSORS])
    except (ValueError, SafetensorError) as error:
        raise LoadError(f"pyrys.load: {where} cannot be read: {error}") from None
    return manifest, program, tensors


def _parse_manifest(data: bytes | None, where: str) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise LoadError(f"pyrys.load: {where} is not a pyrys save: it has no {MANIFEST}")
    try:
        manifest = _json(data)
    except ValueError as error:
        raise LoadError(f"pyrys.load: {where}: {MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoadError(f"pyrys.load: {where} is not a pyrys save (its manifest is not of format {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LoadError(f"pyrys.load: {where}: {MANIFEST} gives format_version {version!r}, not a version number "
                        f"(this pyrys writes {FORMAT_VERSION}): the manifest was edited or is not pyrys's")
    if version > FORMAT_VERSION:
        raise LoadError(f"pyrys.load: {where} was saved in format version {version} by pyrys "
                        f"{manifest.get('pyrys', '?')}; this pyrys reads format versions up to {FORMAT_VERSION}. "
                        "Upgrade pyrys, or save the model again with this one")
    if not isinstance(manifest.get("files"), dict):
        raise LoadError(f"pyrys.load: {where}: {MANIFEST} lists no files")
    return manifest
