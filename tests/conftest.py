"""Test-wide rules: no connection leaves this machine (enforced here and in every Ray worker)."""

from __future__ import annotations

import pytest

from festival_serve.ops.up import apply_local_ray_env
from festival_serve.runtime.offline import install_network_guard

install_network_guard()  # before any test module imports a library that might call home
# Before any test imports Ray (it reads its uv switch once, at import): every Ray worker a test starts runs this
# interpreter, not a copy uv builds with only the extras of the `uv run` line.
apply_local_ray_env()


@pytest.fixture(scope="session")
def yolic_layout():
    from festival_serve.models.hazard_cells.yolic import load_layout

    return load_layout("outdoor")
