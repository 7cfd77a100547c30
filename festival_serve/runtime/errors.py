"""Errors that model loading raises across modules (kept here so no two modules import each other for them)."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The requested runtime or device cannot run here (missing package, provider or GPU)."""


class GpuOnlyViolation(RuntimeError):
    """GPU-only mode is on and a model, a tensor or an execution provider would run on the CPU."""
