"""CPU time and resident memory of a server's whole process tree (a Ray cluster started by the
server's command, or the baseline's single process), sampled while load runs.

Processes are named by what they are: a Serve replica by its deployment (``SignDetector``), Ray's
own processes by their role (``raylet``, ``gcs_server``, ``ServeController``, ``ProxyActor`` …).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from dataclasses import dataclass, field

import psutil

GB = 1024**3


def process_label(proc: psutil.Process) -> str:
    try:
        cmdline = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    if not cmdline:
        return name
    if cmdline[0].startswith("ray::"):
        # "ray::ServeReplica:festival:SignDetector", "ray::ServeController", "ray::IDLE"
        return cmdline[0].split()[0].removeprefix("ray::").split(":")[-1]
    program = Path(cmdline[0]).name
    if program.startswith("python"):
        args = cmdline[1:]
        for i, arg in enumerate(args):
            if arg == "-m" and i + 1 < len(args):
                return _MODULES.get(args[i + 1], args[i + 1])
            if not arg.startswith("-"):
                script = Path(arg).name  # ray's dashboard.py, log_monitor.py …, or a console script
                return _MODULES.get(script, Path(arg).stem)
        return program
    return _MODULES.get(program, program)  # raylet, gcs_server, uv …


#: Friendlier names for the entry points of the two systems under test.
_MODULES = {"festival_serve.measure.baseline": "baseline", "festival_serve.cli": "driver", "festival-serve": "driver"}


def tree(root_pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Usage:
    """What one process (by pid) used over a window."""

    label: str
    cpu_s: float = 0.0
    peak_rss: int = 0


@dataclass
class TreeSampler:
    """Samples ``root_pid``'s process tree every ``interval_s`` between ``start()`` and ``stop()``."""

    root_pid: int
    interval_s: float = 0.5
    usage: dict[int, Usage] = field(default_factory=dict)
    peak_total_rss: int = 0
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_start: dict[int, float] = {}

    def _sample(self) -> None:
        total = 0
        for proc in tree(self.root_pid):
            try:
                with proc.oneshot():
                    times, rss = proc.cpu_times(), proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            cpu = times.user + times.system
            if proc.pid not in self.usage:
                self.usage[proc.pid] = Usage(process_label(proc))
                # Alive at start(): count from now. Born during the window: all its CPU counts.
                self._cpu_start[proc.pid] = cpu if self._thread is None else 0.0
            entry = self.usage[proc.pid]
            # A Ray worker starts as setup_worker.py/default_worker.py and renames itself once it hosts
            # a replica: name it by what it is now.
            entry.label = process_label(proc)
            entry.cpu_s = cpu - self._cpu_start[proc.pid]
            entry.peak_rss = max(entry.peak_rss, rss)
            total += rss
        self.peak_total_rss = max(self.peak_total_rss, total)

    def start(self) -> "TreeSampler":
        self._started = time.perf_counter()
        self._sample()  # the CPU baseline of every process alive now
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-sampler")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> "TreeSampler":
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._started
        return self

    def summary(self) -> dict:
        """CPU cores used and peak RSS, per label (replicas of one deployment summed) and in total."""
        by_label: dict[str, dict] = {}
        for entry in self.usage.values():
            row = by_label.setdefault(entry.label, {"processes": 0, "cpu_s": 0.0, "peak_rss_mb": 0.0})
            row["processes"] += 1
            row["cpu_s"] += entry.cpu_s
            row["peak_rss_mb"] += entry.peak_rss / 1024**2
        for row in by_label.values():
            row["cpu_cores"] = round(row["cpu_s"] / self.wall_s, 3) if self.wall_s else 0.0
            row["cpu_s"] = round(row["cpu_s"], 2)
            row["peak_rss_mb"] = round(row["peak_rss_mb"], 1)
        cpu_total = sum(e.cpu_s for e in self.usage.values())
        return {
            "cpu_s": round(cpu_total, 2),
            "cpu_cores": round(cpu_total / self.wall_s, 3) if self.wall_s else 0.0,
            "peak_rss_gb": round(self.peak_total_rss / GB, 3),
            "wall_s": round(self.wall_s, 2),
            "processes": dict(sorted(by_label.items(), key=lambda kv: -kv[1]["peak_rss_mb"])),
        }


def resident_gb(root_pid: int) -> dict:
    """Resident memory of the tree now: RSS summed (counts shared pages once per process) and PSS
    (shared pages split between the processes sharing them; what the tree really holds)."""
    rss = pss = 0
    for proc in tree(root_pid):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return {"rss_gb": round(rss / GB, 3), "pss_gb": round(pss / GB, 3)}
