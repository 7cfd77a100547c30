"""Offline by construction: environment switches for the model libraries, and a socket guard that
refuses any connection leaving this machine.

The local run and the test suite install the guard in every Ray worker (``worker_process_setup_hook``)
as well as in the driver, so a library that tries to reach a hub fails loudly instead of hanging.
"""

from __future__ import annotations

import ipaddress
import os
import socket

#: Switches that keep transformers, huggingface_hub, ultralytics and Ray from calling home.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class NetworkBlocked(ConnectionError):
    """A connection to another machine was attempted while running offline."""


def apply_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def _local_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def _is_local(address, local: set[str]) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback or host in local
    except ValueError:  # a host name: resolve it without connecting anywhere but the resolver cache
        return host == "localhost"


def install_network_guard() -> None:
    """Make ``socket.connect`` refuse every address that is not this machine's own (idempotent)."""
    if getattr(socket.socket.connect, "_festival_guard", False):
        return
    apply_offline_env()
    local = _local_addresses()
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address) -> None:
        if not _is_local(address, local):
            raise NetworkBlocked(f"festival-serve is running offline: connection to {address!r} refused")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    connect._festival_guard = True  # type: ignore[attr-defined]
    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
