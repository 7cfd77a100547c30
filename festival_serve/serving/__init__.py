"""Serving wing: the per-request path — HTTP contract, the frame's flow, admission, coalescing, batching, metrics.

No model code: imports only ``pipeline`` and ``runtime``."""
