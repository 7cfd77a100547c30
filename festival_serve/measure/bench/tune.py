"""The bench's peers at their best, and ratios that survive the machine's drift.

**Tuning.** A user who picks LitServe (or the one-process baseline) sets its runtime's threads and its batching for
their machine; the bench does the same before it measures: it starts the system once per candidate setting, runs a
short calibration (closed loop, ``calibration_clients`` clients, mixed frames, describe=false) and keeps the setting
with the best goodput. Knobs are tried one at a time, each with the best of the knobs before it fixed (threads
first: they matter most). What was tried and what was kept go into the report.

**Interleaving.** The machine's speed moves by up to 1.7x within minutes, so systems measured one after another
are compared across different machines. The bench keeps every system started and, for each headline load point,
measures the systems one after another, then does it again (``rounds``), each round in a rotated order; a paused
system is frozen (SIGSTOP over its process tree) so that it takes no CPU from the one being measured. A ratio is
the median of the per-round ratios, with their spread (min, max).
"""

from __future__ import annotations

import signal
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable

import psutil

from festival_serve.measure.procstats import tree


@dataclass(frozen=True)
class PeerSetting:
    """What a user of LitServe would tune: ONNX Runtime / torch threads per session (None: the runtime's default)
    and LitServe's batching (most requests per batch, longest wait for one to fill, seconds)."""

    threads: int | None
    max_batch_size: int
    batch_timeout_s: float

    def label(self) -> str:
        threads = "default" if self.threads is None else str(self.threads)
        return f"threads {threads}, batch {self.max_batch_size}, wait {self.batch_timeout_s * 1000:g} ms"


def thread_candidates(cores: int) -> tuple[int, ...]:
    """1, 2, 4, … and the core count itself: the thread counts worth trying on ``cores`` cores."""
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return (*out, max(1, cores))


def coordinate_search(start: dict, knobs: dict[str, Iterable], score: Callable[[dict], float],
                      progress: Callable[[str], None] = lambda line: None) -> tuple[dict, list[dict]]:
    """Best setting by one knob at a time: for each knob in order, try each of its values with the knobs before it
    at their best (and those after it at ``start``), keep the best ``score``. Returns the best setting and every
    trial (``{"setting": …, "score": …}``), each setting measured once."""
    best, tried, scores = dict(start), [], {}
    for knob, values in knobs.items():
        for value in values:
            candidate = {**best, knob: value}
            key = tuple(sorted(candidate.items()))
            if key not in scores:
                scores[key] = score(candidate)
                tried.append({"setting": candidate, "score": scores[key]})
                progress(f"    {_describe(candidate)}: {scores[key]:.2f}")
        best = max(({**best, knob: value} for value in values), key=lambda c: scores[tuple(sorted(c.items()))])
    return best, tried


def _describe(setting: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in setting.items())


# -- interleaving -------------------------------------------------------------------------------------------


def pause(root_pid: int) -> None:
    """Freeze a system's whole process tree (its processes keep their memory and sockets, and take no CPU)."""
    _signal_tree(root_pid, signal.SIGSTOP)


def resume(root_pid: int) -> None:
    _signal_tree(root_pid, signal.SIGCONT)


def _signal_tree(root_pid: int, sig: int) -> None:
    for proc in tree(root_pid):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def frozen(root_pid: int) -> bool:
    """Whether every process of the tree is stopped (what a measurement of another system may rely on)."""
    procs = tree(root_pid)
    try:
        return bool(procs) and all(p.status() == psutil.STATUS_STOPPED for p in procs)
    except psutil.NoSuchProcess:
        return False


def round_orders(systems: list[str], rounds: int) -> list[list[str]]:
    """The order systems are measured in, per round: rotated each round, so no system always goes first (or
    always follows the same one)."""
    n = len(systems)
    return [[systems[(i + r) % n] for i in range(n)] for r in range(rounds)] if n else [[] for _ in range(rounds)]


def median_point(points: list[dict]) -> dict:
    """One load point from its repeats: the repeat with the median goodput (the lower median for an even count),
    so every field of it comes from one measurement, plus every repeat's goodput and p50."""
    ranked = sorted(points, key=lambda p: p["goodput_rps"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["repeats"] = len(points)
    chosen["round_goodput_rps"] = [p["goodput_rps"] for p in points]
    chosen["round_p50_ms"] = [p["p50_ms"] for p in points]
    return chosen


def median_and_spread(values: list[float | None]) -> tuple[float | None, list[float] | None]:
    """Median of the values that exist, and their [min, max]."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return round(statistics.median(present), 3), [round(min(present), 3), round(max(present), 3)]
