"""Run a network on a batch: one interface, one class per runtime, chosen by name from config."""

from festival_serve.backends.base import (
    BACKENDS,
    Backend,
    BackendUnavailable,
    NetworkSource,
    create_backend,
)

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "NetworkSource", "create_backend"]
