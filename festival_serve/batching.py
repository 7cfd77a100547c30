"""Running one forward pass over a batch so that a bad item fails alone (no Ray import).

A batch that raises is split in halves and each half retried, down to single items: one poisoned
item costs about 2·log2(N) + 1 forward passes and an error for itself only. A CUDA out-of-memory
error takes the same path, after releasing the allocator's cached blocks, so a batch too large for
the memory left on a shared GPU finishes in smaller passes instead of failing; only an item that
still runs out of memory alone is answered with an error.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError``, or any error whose message says "out of memory" (ONNX Runtime,
    TensorRT and CUDA itself report it in their messages). torch is only looked at if already imported."""
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(oom_type, type) and isinstance(exc, oom_type):
        return True
    return "out of memory" in str(exc).lower()


def _release_cached_gpu_memory() -> None:
    torch = sys.modules.get("torch")  # a replica without torch has no torch allocator cache to release
    empty_cache = getattr(getattr(torch, "cuda", None), "empty_cache", None)
    if empty_cache is not None:
        empty_cache()


def run_isolating(work: Callable[[list], list], items: list, *, make_error: Callable[[Exception], Any],
                  is_oom: Callable[[BaseException], bool] = is_out_of_memory, label: str = "batch") -> list:
    """``work(items)`` (one forward pass, one result per item, in order); where it raises, the results of
    its halves, recursively, with ``make_error(exc)`` for a single item that still fails. ``make_error`` is
    called inside the ``except`` block, so it may log the exception with its traceback."""
    if not items:
        return []
    try:
        results = list(work(items))
        if len(results) != len(items):
            raise ValueError(f"{label}: {len(results)} results for {len(items)} items")
        return results
    except Exception as e:  # noqa: BLE001 - every item must get an answer
        oom = is_oom(e)
        if oom:
            _release_cached_gpu_memory()
        if len(items) == 1:
            return [make_error(e)]
        half = len(items) // 2
        logger.warning("%s of %d items failed (%s%s); retrying as %d + %d", label, len(items), type(e).__name__,
                       ", out of memory" if oom else "", half, len(items) - half)
    return (run_isolating(work, items[:half], make_error=make_error, is_oom=is_oom, label=label)
            + run_isolating(work, items[half:], make_error=make_error, is_oom=is_oom, label=label))
