"""Model stores that tests build: what they copy from the project's own."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_shipped_reader(store: Path) -> None:
    """The trained sign-text recognizer and its dictionary (small, shipped in ``models/``), which
    serve_config.yaml's reader serves; not its ONNX export, which the reader makes on first use."""
    shutil.copytree(ROOT / "models" / "sign_reader", store / "sign_reader",
                    ignore=shutil.ignore_patterns("*.onnx", "*.lock"))
