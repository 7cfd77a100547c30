"""The suite itself is offline: a connection to another machine fails at once."""

import socket

import pytest

from festival_serve.runtime.offline import NetworkBlocked


def test_outbound_connection_is_refused():
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("203.0.113.5", 80), timeout=1)


def test_loopback_is_allowed():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    server.close()
