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


def build_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Return ``target``, making it with ``write(tmp_path)`` first if absent.

    The file is written under a temporary name and renamed into place, so replicas that start together
    never read a half-written artefact (the loser of the race simply overwrites with identical bytes).
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600; give the artefact the permissions of any file this process makes,
        # so replicas running as another user can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
