"""What the time-budgeted PyTorch trainers share: the run's start, the learning-rate schedule and the CPU arithmetic."""

from __future__ import annotations

import math
import time


def start_run(hours: float | None, steps: int | None, *, threads: int | None, seed: int) -> float:
    """Refuse a run without a budget, give torch ``threads`` (None: its default) and ``seed``; returns the start
    time (``time.perf_counter``, s) the budget counts from."""
    import torch

    if hours is None and steps is None:
        raise ValueError("give a budget: hours or steps")
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return started


def learning_rate(base: float, step: int, done: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to 2% of it as ``done`` goes 0 -> 1."""
    ramp = min(1.0, (step + 1) / max(1, warmup))
    return base * ramp * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def use_bf16(precision: str) -> bool:
    """``auto``: bfloat16 autocast where the CPU computes bf16 natively (AVX512-BF16/AMX: 2.4x the lines/s
    of float32 at the same loss, measured on this machine's Xeon), float32 elsewhere (emulated bf16 is slower)."""
    import torch

    if precision == "auto":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16"
