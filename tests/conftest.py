"""Test-wide rules: no connection leaves this machine (enforced here and in every Ray worker); the process ends
with pytest's own exit status once the run is reported (below)."""

from __future__ import annotations

import os
import sys

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


# This process starts and shuts down five Ray sessions (test_front_proxy, test_graph, test_listeners,
# test_local_cluster, test_worker_environment), and Ray 2.60 may then crash it while the interpreter finalizes, after
# every test has run and the summary is out: threads a session left (its Serve handles' routers) touch the freed
# core worker (ray-project/ray#31145, restarting Ray in one process). Seen once in three full runs, as exit 139 after
# "679 passed". Nothing is left to run or report by then, so the process ends with pytest's status instead.
_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    if _exit_status is not None and "ray" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
