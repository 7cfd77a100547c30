"""Models wing: one package per stage (named after it) — architectures, pre/post-processing, checkpoint loading.

No Ray, no HTTP: imports only ``pipeline`` and ``runtime``."""
