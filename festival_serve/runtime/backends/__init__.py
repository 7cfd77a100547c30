"""Run a network on a batch: one interface, one class per runtime, chosen by name from config."""

from festival_serve.runtime.backends.base import DEFAULT_PLACEMENT, Backend, BackendUnavailable, NetworkSource, Placement
from festival_serve.runtime.backends.registry import BACKENDS, choose_backend, create_backend

__all__ = ["BACKENDS", "DEFAULT_PLACEMENT", "Backend", "BackendUnavailable", "NetworkSource", "Placement",
           "choose_backend", "create_backend"]
