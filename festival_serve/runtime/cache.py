"""Content-keyed artefact cache: derived files (ONNX exports, engines) named by their source's hash."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def derived_name(source: Path, *tags: str, stem: str | None = None, digest: str | None = None,
                 suffix: str = ".onnx") -> str:
    """``<stem>.<sha12>[.<tag>…]<suffix>``: the file name of something derived from ``source`` (an ONNX export,
    an fp16 copy), keyed by the first 12 hex digits of the source's sha256 (``digest`` when already known), so
    a retrained or edited source never serves a stale derivative. ``stem`` defaults to ``source``'s."""
    key = (digest or file_sha256(Path(source)))[:12]
    return ".".join([stem or Path(source).stem, key, *tags]) + suffix


def write_atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """Make ``target`` with ``write(tmp_path)``: written under a temporary name beside it and renamed into place,
    so a reader never sees a half-written file (of two writers racing, the last rename wins, whole)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600; give the file the permissions of any file this process makes,
        # so replicas running as another user can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Return ``target``, making it with ``write(tmp_path)`` first if absent (``write_atomic``), so replicas
    that start together never read a half-written artefact (the loser of the race overwrites with identical
    bytes)."""
    return target if target.exists() else write_atomic(target, write)
