"""Weights paths as a client sees them, in ``/v1/models`` and in a model's unavailable reason: relative to the
model store, or the file name alone, never where a machine keeps its files. No Ray, no HTTP: the model
replicas use it as the ingress does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: The keys of a model's ``model_info()`` that hold weights paths.
PATH_KEYS = ("weights", "classifier")
#: "det=/s/a.onnx rec=/s/b.onnx": the sign reader's weights, one path per network.
_NAMED_PATHS = re.compile(r" (?=[a-z_]+=)")


def public_path(path: str | os.PathLike, model_store: str | os.PathLike | None) -> str:
    """A weights path as a client sees it: relative to the model store when inside it
    (``sign_detector/signs.pt``), else the file name alone, never where a machine keeps its files. A
    relative path is read as the settings read it, relative to the store (so a label such as
    ``rapidocr-3.4.0/PP-OCRv6_det_small.onnx``, or ``bundled``, stays as it is)."""
    given = Path(path).expanduser()
    if model_store is not None:
        store = Path(model_store).expanduser()
        full = given if given.is_absolute() or given.is_relative_to(store) else store / given
        # As written first, then through symlinks (a store reached through a link, weights resolved by a loader).
        for root, inside in ((Path(os.path.abspath(store)), Path(os.path.abspath(full))),
                             (store.resolve(), full.resolve())):
            if inside.is_relative_to(root) and inside != root:
                return inside.relative_to(root).as_posix()
    return given.name


def public_model_info(info: Any, model_store: str | os.PathLike | None) -> Any:
    """A model's ``model_info()`` (nested dicts and lists) with every weights path made public (``public_path``)."""
    if isinstance(info, dict):
        return {key: _public_weights(value, model_store) if key in PATH_KEYS and isinstance(value, str)
                else public_model_info(value, model_store) for key, value in info.items()}
    if isinstance(info, list):
        return [public_model_info(value, model_store) for value in info]
    return info


def _public_weights(value: str, model_store: str | os.PathLike | None) -> str:
    parts = _NAMED_PATHS.split(value)
    if len(parts) > 1 or re.match(r"[a-z_]+=", value):
        return " ".join(f"{name}={public_path(path, model_store)}"
                        for name, _, path in (part.partition("=") for part in parts))
    return public_path(value, model_store)
