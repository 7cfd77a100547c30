"""``festival-serve bench``: the Serve graph against the single-process baseline and a LitServe peer
(``bench.peer``), same models, same images, same load client; then per-model microbenchmarks. Writes JSON, Markdown and plots, and
``docs/bench/latest.json`` with the headline ratios (printed last).

The models are the production architectures at production size: trained weights where the model
store has them, shape-true stand-ins (``festival_serve.training.standins``) elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from festival_serve.runtime.environment import package_versions
from festival_serve.measure import loadgen
from festival_serve.measure.bench import report, tune
from festival_serve.measure.bench.peer import BATCH_TIMEOUT_S, MAX_BATCH_SIZE
from festival_serve.measure.bench.tune import PeerSetting, thread_candidates
from festival_serve.measure.bench.targets import AT_MOST, FRAME_TAGS, TARGETS
from festival_serve.measure.procstats import TreeSampler, resident_gb
from festival_serve.pipeline.settings import PipelineArgs



@dataclass(frozen=True)
class Plan:
    mode: str
    concurrency: tuple[int, ...]  # closed-loop clients, describe=false
    describe_concurrency: tuple[int, ...]  # closed-loop clients, describe=true
    rate_fractions: tuple[float, ...]  # open-loop rates, as fractions of the baseline's peak throughput
    duration_s: float  # measured window per describe=false point (after the warm-up)
    describe_duration_s: float
    warmup_s: float
    scenes: int  # distinct held-out images cycled by the client
    new_tokens: int  # the SmolVLM-shaped stand-in's fixed number of new tokens (trained weights stop on their own)
    micro_batches: tuple[int, ...]
    vlm_batches: tuple[int, ...]
    micro_repeats: int
    micro_min_s: float
    # Overload: open-loop arrivals at these multiples of the system's own measured capacity (its peak
    # describe=false goodput), each request with this budget (x-request-timeout-seconds).
    overload_multiples: tuple[float, ...] = (1.0, 2.0, 5.0)
    overload_duration_s: float = 10.0
    overload_budget_s: float = 2.0
    # Closed-loop clients (describe=false) on frames that print text (the reader runs) and on frames that do not.
    split_concurrency: tuple[int, ...] = (1, 16)
    # Interleaved repeats of the headline points (festival_serve.measure.bench.tune): every system measured at a
    # point, then again, ``rounds`` times; ratios are the medians of the per-round ratios, with their spread.
    rounds: int = 3
    # Tuning the peer and the baseline before they are measured: each candidate setting gets a closed loop of
    # ``calibration_clients`` clients for ``calibration_s`` (after ``warmup_s``), mixed frames, describe=false.
    # Thread candidates are 1, 2, 4, … up to the cores; then the peer's batching, (max batch size, wait s).
    calibration_s: float = 6.0
    calibration_clients: int = 16
    peer_batches: tuple[tuple[int, float], ...] = ((16, 0.01), (16, 0.001), (32, 0.005), (8, 0.002))


QUICK = Plan("quick", (1, 4, 16), (1, 8), (0.5, 1.0, 1.5), 6.0, 15.0, 2.0, 16, 16,
             (1, 4, 16), (1, 4), 3, 0.3)
FULL = Plan("full", (1, 4, 16, 64), (1, 4, 16, 64), (0.5, 1.0, 1.5, 2.0), 20.0, 40.0, 3.0, 32, 48,
            (1, 2, 4, 8, 16, 32), (1, 2, 4, 8), 5, 1.0, overload_duration_s=20.0)
#: Without a GPU a described frame takes seconds: 64 clients would spend ~10 minutes per point just
#: warming up, so the CPU plan stops at 16 (pass --describe-concurrency to insist).
FULL_CPU_DESCRIBE_CONCURRENCY = (1, 4, 16)

SYSTEMS = ("baseline", "graph", "peer")
#: The frame sets: "mixed" (the held-out scenes as they come), "text_signs" (each prints text) and "no_text".
FRAME_SETS = ("mixed", "text_signs", "no_text")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _batches(text: str) -> tuple[tuple[int, float], ...]:
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        size, sep, wait = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: give SIZE:WAIT_S, e.g. 16:0.01")
        out.append((int(size), float(wait)))
    return tuple(out)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="the short plan (~30 min on 2 cores: tuning, three interleaved rounds); default: full")
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--model-store", help="override args.model_store (trained weights are used where present)")
    parser.add_argument("--stand-ins", type=Path, help="where shape-true stand-in models are built and cached "
                                                       "(default: ~/.cache/festival-serve/stand-ins)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="report folder (default: %(default)s)")
    parser.add_argument("--graph-port", type=int, default=8701)
    parser.add_argument("--baseline-port", type=int, default=8702)
    parser.add_argument("--peer-port", type=int, default=8703)
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds for a server to become ready")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="which systems to run (default: %(default)s; peer is LitServe with the same models)")
    parser.add_argument("--no-micro", action="store_true", help="skip the per-model microbenchmarks")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs in OUT/logs/")
    parser.add_argument("--graph-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the graph's Ray processes (repeatable), e.g. to try a Serve setting")
    override = parser.add_argument_group("plan overrides (comma-separated lists)")
    override.add_argument("--concurrency", type=_ints)
    override.add_argument("--describe-concurrency", type=_ints)
    override.add_argument("--rate-fractions", type=_floats)
    override.add_argument("--duration", type=float, dest="duration_s")
    override.add_argument("--describe-duration", type=float, dest="describe_duration_s")
    override.add_argument("--warmup", type=float, dest="warmup_s")
    override.add_argument("--scenes", type=int)
    override.add_argument("--new-tokens", type=int)
    override.add_argument("--micro-batches", type=_ints)
    override.add_argument("--vlm-batches", type=_ints)
    override.add_argument("--overload-multiples", type=_floats)
    override.add_argument("--overload-duration", type=float, dest="overload_duration_s")
    override.add_argument("--overload-budget", type=float, dest="overload_budget_s")
    override.add_argument("--split-concurrency", type=_ints,
                          help="clients for the text-sign and no-text frame sets (describe=false)")
    override.add_argument("--rounds", type=int, help="interleaved repeats of the headline points")
    override.add_argument("--calibration", type=float, dest="calibration_s", help="seconds per tuning candidate")
    tuning = parser.add_argument_group("tuning the peer and the baseline (one value: fixed, not tuned)")
    tuning.add_argument("--peer-threads", type=_ints, help="thread candidates (default: 1, 2, 4, … up to the cores)")
    tuning.add_argument("--peer-batches", type=_batches,
                        help="LitServe batching candidates as SIZE:WAIT_S, e.g. 16:0.01,16:0.001 (default: the plan's)")
    tuning.add_argument("--baseline-threads", type=_ints, help="thread candidates for the baseline")
    return parser


def plan_from(options: argparse.Namespace, *, cuda: bool = False) -> Plan:
    plan = QUICK if options.quick else FULL
    if not options.quick and not cuda:
        plan = replace(plan, describe_concurrency=FULL_CPU_DESCRIBE_CONCURRENCY)
    fields = {k: getattr(options, k) for k in asdict(plan) if getattr(options, k, None) is not None}
    return replace(plan, **fields)


# -- one system under load ---------------------------------------------------------------------------


def _batch_delta(before: list[dict], after: list[dict]) -> dict:
    """Batches run per size at every stage during one point (from ``/v1/models``' counters)."""
    out = {}
    for old, new in zip(before, after):
        sizes_old = (old.get("batch") or {}).get("observed_sizes", {})
        sizes_new = (new.get("batch") or {}).get("observed_sizes", {})
        delta = {int(k): v - sizes_old.get(k, 0) for k, v in sizes_new.items() if v - sizes_old.get(k, 0) > 0}
        items = sum(k * v for k, v in delta.items())
        out[new["name"]] = {"sizes": dict(sorted(delta.items())), "batches": sum(delta.values()),
                            "mean": round(items / sum(delta.values()), 2) if delta else None}
    return out


def measure(server, load, frames: str = "mixed") -> dict:
    """Run one load point against ``server``: latency/throughput, batch sizes, CPU (and CPU per answer)
    and memory."""
    before = server.models()
    sampler = TreeSampler(server.process.pid).start()
    result = asyncio.run(load)
    sampler.stop()
    summary = result.summary()
    summary["frames"] = frames
    summary["goodput_rps"] = result.goodput_rps()
    summary["batches"] = _batch_delta(before, server.models())
    summary["resources"] = sampler.summary()
    cores = summary["resources"].get("cpu_cores")
    summary["cpu_ms_per_answer"] = (round(cores * 1000 / summary["goodput_rps"], 1)
                                    if cores is not None and summary["goodput_rps"] else None)
    return summary


@dataclass(frozen=True)
class Point:
    """One closed-loop load point: clients sending back to back."""

    describe: bool
    frames: str
    clients: int


def closed_points(plan: Plan, frame_sets: dict[str, list[bytes]]) -> list[Point]:
    """Every closed-loop point of the plan, in the order they are reported."""
    points = [Point(False, "mixed", c) for c in plan.concurrency]
    points += [Point(False, frames, c) for frames in FRAME_SETS[1:] if frame_sets.get(frames)
               for c in plan.split_concurrency]
    return points + [Point(True, "mixed", c) for c in plan.describe_concurrency]


def headline_points(plan: Plan, name: str, frame_sets: dict[str, list[bytes]]) -> list[Point]:
    """The points the headline ratios are taken at, measured in every round: one client on mixed frames (p50
    against the peer and the baseline), the most clients on every frame set (goodput against the peer) and the
    most describe=true clients (peak against the peer and the baseline). The baseline answers one request at a
    time, so only its one-client and describe=true points enter a ratio."""
    top, split_top = max(plan.concurrency), max(plan.split_concurrency)
    points = [Point(False, "mixed", min(plan.concurrency))]
    if name != "baseline":
        points.append(Point(False, "mixed", top))
        points += [Point(False, frames, split_top) for frames in FRAME_SETS[1:] if frame_sets.get(frames)]
    points.append(Point(True, "mixed", max(plan.describe_concurrency)))
    return list(dict.fromkeys(points))


class Bench:
    """The systems under test, started side by side: one is measured at a time while the others are frozen
    (``tune.pause``), so each point has the machine to itself and the systems' points lie minutes apart, not a
    whole system's run apart."""

    def __init__(self, servers: dict, frame_sets: dict[str, list[bytes]], plan: Plan, progress) -> None:
        self.servers, self.frame_sets, self.plan, self.progress = servers, frame_sets, plan, progress
        self.schedule: list[dict] = []  # (round, system, point) in the order measured

    def measure(self, name: str, load, frames: str) -> dict:
        server = self.servers[name]
        tune.resume(server.process.pid)
        others_frozen = all(tune.frozen(s.process.pid) for n, s in self.servers.items() if n != name)
        try:
            point = measure(server, load, frames)
        finally:
            tune.pause(server.process.pid)
        point["others_frozen"] = others_frozen
        return point

    def closed(self, name: str, point: Point, round_index: int | None = None) -> dict:
        plan = self.plan
        url = f"{self.servers[name].url}/v1/analyze"
        load = loadgen.closed_loop(url, self.frame_sets[point.frames], concurrency=point.clients,
                                   duration_s=plan.describe_duration_s if point.describe else plan.duration_s,
                                   describe=point.describe, warmup_s=plan.warmup_s, timeout_s=600, multipart=True)
        result = self.measure(name, load, point.frames)
        result["round"] = round_index
        self.schedule.append({"round": round_index, "system": name, **asdict(point)})
        self.progress(_point_line(name, result) + ("" if round_index is None else f"  (round {round_index + 1})"))
        return result

    def rounds(self) -> dict[str, list[dict]]:
        """Every system's headline points, ``plan.rounds`` times, interleaved point by point in rotated orders."""
        names = list(self.servers)
        wanted = {name: headline_points(self.plan, name, self.frame_sets) for name in names}
        specs = list(dict.fromkeys(p for name in names for p in wanted[name]))
        measured: dict[str, list[dict]] = {name: [] for name in names}
        for r, order in enumerate(tune.round_orders(names, self.plan.rounds)):
            for point in specs:
                for name in order:
                    if point in wanted[name]:
                        measured[name].append(self.closed(name, point, r))
        return measured

    def rest(self, name: str, repeated: list[dict], rates: dict[bool, float] | None) -> dict:
        """The rest of the plan against one system: closed-loop points not in the rounds, open-loop rates (the
        baseline's peak as base when known, else this system's own) and overload; then its load points, each
        the median of its repeats."""
        started = time.perf_counter()
        server, plan = self.servers[name], self.plan
        heads = set(headline_points(plan, name, self.frame_sets))
        points: list[dict] = []
        for point in closed_points(plan, self.frame_sets):
            if point in heads:
                points.append(tune.median_point([p for p in repeated if _point_of(p) == point]))
            else:
                points.append(self.closed(name, point))
        url, base_rates = f"{server.url}/v1/analyze", {}
        for describe in (False, True):
            peak = max((p["goodput_rps"] for p in points if p["describe"] == describe and p["frames"] == "mixed"),
                       default=0.0)
            base_rates[describe] = (rates or {}).get(describe) or peak
            for fraction in plan.rate_fractions:
                rate = round(fraction * base_rates[describe], 3)
                if rate <= 0:
                    continue
                point = self.measure(name, loadgen.open_loop(url, self.frame_sets["mixed"], rate=rate,
                                                             duration_s=plan.describe_duration_s if describe
                                                             else plan.duration_s,
                                                             describe=describe, timeout_s=600, multipart=True),
                                     "mixed")
                points.append(point)
                self.progress(_point_line(name, point))
        tune.resume(server.process.pid)
        try:
            overload = run_overload(server, self.frame_sets["mixed"], plan, points, self.progress)
        finally:
            tune.pause(server.process.pid)
        return {"points": points, "round_points": repeated, "overload": overload,
                "base_rates": {str(k).lower(): v for k, v in base_rates.items()},
                "peak_rss_gb": max((p["resources"]["peak_rss_gb"] for p in points + repeated), default=None),
                "resident_at_end": resident_gb(server.process.pid),
                "processes": _processes(points + repeated), "load_s": round(time.perf_counter() - started, 1)}


def _point_of(p: dict) -> Point:
    return Point(p["describe"], p.get("frames", "mixed"), int(p["level"]))


def _processes(points: list[dict]) -> dict:
    """Per process label over the measured points: CPU cores averaged over their windows, peak RSS."""
    rows: dict[str, dict] = {}
    wall = sum(p["resources"].get("wall_s", 0.0) for p in points)
    for p in points:
        for label, row in p["resources"].get("processes", {}).items():
            into = rows.setdefault(label, {"processes": 0, "cpu_s": 0.0, "peak_rss_mb": 0.0})
            into["processes"] = max(into["processes"], row["processes"])
            into["cpu_s"] += row["cpu_s"]
            into["peak_rss_mb"] = max(into["peak_rss_mb"], row["peak_rss_mb"])
    for row in rows.values():
        row["cpu_cores"] = round(row["cpu_s"] / wall, 3) if wall else 0.0
        row["cpu_s"] = round(row["cpu_s"], 2)
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["peak_rss_mb"]))


def run_overload(server, bodies: list[bytes], plan: Plan, points: list[dict], progress) -> list[dict]:
    """Open-loop arrivals at multiples of this system's own capacity (its peak describe=false goodput),
    every request with ``plan.overload_budget_s``: is excess load turned away fast, and does what is admitted
    keep its latency?"""
    capacity = max((p["goodput_rps"] for p in points if not p["describe"] and p["frames"] == "mixed"), default=0.0)
    if capacity <= 0:
        return []
    url, rows = f"{server.url}/v1/analyze", []
    # The client runs in a process of its own: at ~100 req/s it must keep its arrival schedule, and in this
    # process the resource sampler's thread holds the GIL for tens of ms per sample (measured: refusals the
    # server sent in 20 ms arrived "late" while the client's loop waited for the GIL).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
        for multiple in plan.overload_multiples:
            summary = client.submit(_overload_point, url, bodies, round(multiple * capacity, 3),
                                    plan.overload_duration_s, plan.overload_budget_s).result()
            row = {"multiple": multiple, "capacity_rps": capacity, **summary}
            rows.append(row)
            progress(f"  {server.name:8} overload {multiple:g}x ({row['rate']:g}/s, budget {row['budget_s']:g} s): "
                     f"goodput {row['goodput_rps']} req/s, within budget {row['within_budget']}, shed {row['shed']} "
                     f"(fast {row['shed_fast']}), errors {row['errors']}, hung {row['hung']}")
    return rows


def _overload_point(url: str, bodies: list[bytes], rate: float, duration_s: float, budget_s: float) -> dict:
    """One overload point, run in the client's own process (``run_overload``)."""
    return asyncio.run(loadgen.overload(url, bodies, rate=rate, duration_s=duration_s, budget_s=budget_s,
                                        multipart=True)).summary()


def _point_line(name: str, p: dict) -> str:
    level = f"c={p['level']:g}" if p["mode"] == "closed" else f"rate={p['level']:g}/s"
    return (f"  {name:8} describe={str(p['describe']).lower():5} {p['frames']:10} {p['mode']:6} {level:12} "
            f"{p['goodput_rps']:7.2f} req/s  p50 {p['p50_ms']} ms  p95 {p['p95_ms']} ms  "
            f"errors {p['errors']}  degraded {p['degraded']}  cpu {p['resources']['cpu_cores']} cores")


# -- the run -------------------------------------------------------------------------------------------


def bench_args(config: dict, options: argparse.Namespace, plan: Plan, progress) -> tuple[PipelineArgs, list]:
    from festival_serve.training.standins.store import with_stand_ins

    raw = dict(config["applications"][0].get("args") or {})
    if options.model_store:
        raw["model_store"] = options.model_store
    store = Path(raw.get("model_store", "models")).expanduser()
    raw["model_store"] = str(store if store.is_absolute() else (Path.cwd() / store).resolve())
    args, sources = with_stand_ins(PipelineArgs.model_validate(raw), options.stand_ins, progress=progress)
    if any(s.stage == "scene_describer" and s.kind == "stand-in" for s in sources):
        # The stand-in never stops on its own: the plan fixes what each description costs. Trained weights
        # generate until they end the description (or the config's max_new_tokens), as users get them.
        describer = args.scene_describer.model_copy(update={"max_new_tokens": plan.new_tokens})
        args = args.model_copy(update={"scene_describer": describer})
    return args, sources


def summarize(systems: dict[str, dict], efficiency: dict | None = None) -> dict:
    """The headline numbers. Ratios between systems are the medians of per-round ratios (the interleaved rounds:
    both systems measured minutes apart at that point), with ``_spread`` [min, max] beside each; where a point
    was measured once, its one ratio."""
    def points(name: str, describe: bool, frames: str = "mixed") -> list[dict]:
        return [p for p in systems.get(name, {}).get("points", [])
                if p["describe"] == describe and p.get("frames", "mixed") == frames]

    def closed(name: str, clients: int, frames: str, describe: bool = False) -> dict | None:
        return next((p for p in points(name, describe, frames) if p["mode"] == "closed" and p["level"] == clients),
                    None)

    def by_round(name: str, clients: int, frames: str, describe: bool) -> dict:
        """round → that round's point (the median point alone, as round 0, when the point was not repeated)."""
        repeats = {p["round"]: p for p in systems.get(name, {}).get("round_points", [])
                   if p["describe"] == describe and p.get("frames", "mixed") == frames and p["level"] == clients}
        single = closed(name, clients, frames, describe)
        return repeats or ({0: single} if single else {})

    def paired(a: str, b: str, clients: int | None, frames: str, describe: bool, value) -> list:
        if clients is None:
            return []
        ra, rb = by_round(a, clients, frames, describe), by_round(b, clients, frames, describe)
        return [value(ra[r], rb[r]) for r in sorted(ra.keys() & rb.keys())]

    def goodput_ratio(pa: dict, pb: dict) -> float | None:
        return ratio(pa["goodput_rps"], pb["goodput_rps"])

    def p50_delta(pa: dict, pb: dict) -> float | None:
        return (round(pa["p50_ms"] - pb["p50_ms"], 2)
                if pa["p50_ms"] is not None and pb["p50_ms"] is not None else None)

    def headline(key: str, values: list) -> dict:
        median, spread = tune.median_and_spread(values)
        return {key: median, f"{key}_spread": spread}

    def peak_ratios(a: str, b: str, describe: bool) -> list:
        """a's peak / b's peak goodput, per round (the best of that round's points; a system whose points were
        not repeated: its peak over every point, as round 0)."""
        def peaks(name: str) -> dict:
            rounds: dict = {}
            for p in systems.get(name, {}).get("round_points", []):
                if p["describe"] == describe and p.get("frames", "mixed") == "mixed":
                    rounds[p["round"]] = max(rounds.get(p["round"], 0.0), p["goodput_rps"])
            single = peak(name, describe)
            return rounds or ({0: single} if single is not None else {})

        pa, pb = peaks(a), peaks(b)
        return [ratio(pa[r], pb[r]) for r in sorted(pa.keys() & pb.keys())]

    def against_peer(frames: str, tag: str) -> dict:
        """Graph / peer goodput at 16 clients and graph - peer p50 at one client, describe=false."""
        return {**headline(f"peer_goodput_ratio_c16{tag}", paired("graph", "peer", 16, frames, False, goodput_ratio)),
                **headline(f"peer_p50_delta_ms_c1{tag}", paired("graph", "peer", 1, frames, False, p50_delta))}

    def peak(name: str, describe: bool) -> float | None:
        values = [p["goodput_rps"] for p in points(name, describe)]
        return max(values) if values else None

    def p50_at_1(name: str) -> float | None:
        point = closed(name, 1, "mixed")
        return point["p50_ms"] if point else None

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    def efficiency_of(name: str, frames: str, tag: str) -> dict:
        """Serving efficiency: the models' own CPU per frame (in-process, at their best batch) / the system's CPU
        per answer at its most clients on those frames (16 in both plans); 1.0 would be a server that costs nothing
        beyond its models."""
        model_ms = ((efficiency or {}).get(frames) or {}).get("ms_per_frame")
        busiest = [p for p in points(name, False, frames) if p["mode"] == "closed"]
        point = max(busiest, key=lambda p: p["level"]) if busiest else None
        spent = point.get("cpu_ms_per_answer") if point else None
        prefix = "" if name == "graph" else f"{name}_"
        return {f"{prefix}serving_efficiency{tag}": ratio(model_ms, spent)}

    g1, b1 = p50_at_1("graph"), p50_at_1("baseline")
    summary = {
        **headline("overhead_ms_p50", paired("graph", "baseline", 1, "mixed", False, p50_delta)),
        "graph_p50_ms_c1": g1,
        "baseline_p50_ms_c1": b1,
        "throughput_ratio_nodescribe": ratio(peak("graph", False), peak("baseline", False)),
        **headline("throughput_ratio_describe", peak_ratios("graph", "baseline", True)),
        **headline("peer_goodput_ratio_describe", peak_ratios("graph", "peer", True)),
        "graph_peak_rps_nodescribe": peak("graph", False),
        "baseline_peak_rps_nodescribe": peak("baseline", False),
        "graph_peak_rps_describe": peak("graph", True),
        "baseline_peak_rps_describe": peak("baseline", True),
        "graph_rss_gb": systems.get("graph", {}).get("peak_rss_gb"),
        "graph_pss_gb_at_end": systems.get("graph", {}).get("resident_at_end", {}).get("pss_gb"),
        "baseline_rss_gb": systems.get("baseline", {}).get("peak_rss_gb"),
        "peer_rss_gb": systems.get("peer", {}).get("peak_rss_gb"),
        "peer_peak_rps_nodescribe": peak("peer", False),
        "peer_peak_rps_describe": peak("peer", True),
        **{k: v for frames, tag in FRAME_TAGS.items() for k, v in against_peer(frames, tag).items()},
        **{k: v for frames, tag in FRAME_TAGS.items() for name in ("graph", "peer")
           for k, v in efficiency_of(name, frames, tag).items()},
        "model_cpu_ms_per_frame": {frames: (row or {}).get("ms_per_frame") for frames, row in (efficiency or {}).items()},
        **overload_summary(systems.get("graph", {}).get("overload", []), prefix="overload"),
        **overload_summary(systems.get("baseline", {}).get("overload", []), prefix="baseline_overload"),
    }
    met = {}
    for key, target in TARGETS.items():
        value = summary.get(key)
        if value is not None:
            met[key] = value <= target if key in AT_MOST else value >= target
    summary["targets"] = TARGETS
    summary["targets_met"] = met
    return summary


def overload_summary(rows: list[dict], *, prefix: str) -> dict:
    """At the largest multiple (5x): share of answers within budget, share of refusals that were fast and
    said Retry-After, and goodput against the 1x point's."""
    by_multiple = {row["multiple"]: row for row in rows}
    top = by_multiple.get(max(by_multiple, default=0))
    if top is None:
        return {}
    first = by_multiple.get(1.0)
    tag = f"{top['multiple']:g}x"
    ratio = (round(top["goodput_rps"] / first["goodput_rps"], 3)
             if first is not None and first["goodput_rps"] else None)
    return {f"{prefix}_within_budget_{tag}": top["within_budget"], f"{prefix}_shed_fast_{tag}": top["shed_fast"],
            f"{prefix}_goodput_ratio_{tag}": ratio, f"{prefix}_hung_{tag}": top["hung"]}


#: A calibration candidate is stopped with this much grace (s) before its tree is killed: it holds nothing worth a
#: clean shutdown, and LitServe's workers took the default 60 s to leave on SIGINT.
CALIBRATION_STOP_GRACE_S = 5.0


def calibrate(name: str, make, knobs: dict[str, tuple], bodies: list[bytes], plan: Plan, start_timeout_s: float,
              progress) -> tuple[PeerSetting, dict]:
    """``name`` at its best on this machine: ``make(setting)`` gives the server for a setting; each candidate is
    started, loaded for ``plan.calibration_s`` (``plan.calibration_clients`` clients, mixed frames, describe=false)
    and stopped (``tune.coordinate_search``). A knob with one candidate is fixed, not tried; when every knob is,
    nothing is measured."""
    start = {"threads": knobs["threads"][0], "batching": (knobs.get("batching") or [(MAX_BATCH_SIZE, BATCH_TIMEOUT_S)])[0]}

    def setting(values: dict) -> PeerSetting:
        size, wait = values["batching"]
        return PeerSetting(values["threads"], size, wait)

    if all(len(values) == 1 for values in knobs.values()):
        return setting(start), {"chosen": asdict(setting(start)), "tried": [], "calibrated": False}

    def score(values: dict) -> float:
        server = make(setting(values)).start(start_timeout_s, lambda line: None)
        try:
            result = asyncio.run(loadgen.closed_loop(f"{server.url}/v1/analyze", bodies,
                                                     concurrency=plan.calibration_clients,
                                                     duration_s=plan.calibration_s, describe=False,
                                                     warmup_s=plan.warmup_s, timeout_s=600, multipart=True))
        finally:
            server.stop(grace_s=CALIBRATION_STOP_GRACE_S)
        return round(result.goodput_rps(), 3)

    progress(f"{name}: tuning on {plan.calibration_clients} clients, {plan.calibration_s:g} s per candidate "
             f"({', '.join(f'{k}: {len(v)}' for k, v in knobs.items())} candidates)")
    best, tried = tune.coordinate_search(start, {k: v for k, v in knobs.items() if len(v) > 1}, score,
                                         progress=progress)
    chosen = setting(best)
    progress(f"{name}: tuned to {chosen.label()}")
    return chosen, {"chosen": asdict(chosen), "calibrated": True,
                    "tried": [{**asdict(setting(t["setting"])), "goodput_rps": t["score"]} for t in tried]}


def run(options: argparse.Namespace, progress=print) -> dict:
    from festival_serve.measure.bench.micro import run_micro
    from festival_serve.measure.bench.servers import baseline_server, graph_server, peer_server, with_threads
    from festival_serve.runtime.devices import cuda_available
    from festival_serve.ops.up import load_config

    plan = plan_from(options, cuda=cuda_available())
    # The bench polls /v1/models around every point: httpx's line per request would bury the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    graph_env = _env_pairs(options.graph_env)
    wanted = [s.strip() for s in options.systems.split(",") if s.strip()]
    unknown = set(wanted) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    for port in (options.graph_port, options.baseline_port, options.peer_port):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"port {port} is already in use; stop what serves there or pass another port")
    started = time.perf_counter()
    config = load_config(options.config)
    progress(f"bench ({plan.mode}): models")
    args, sources = bench_args(config, options, plan, progress)
    for source in sources:
        progress(f"  {source.stage:16} {source.kind:9} {source.path}")
    frame_sets = held_out_frames(plan.scenes, progress)

    systems: dict[str, dict] = {}
    tuning: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="festival-bench-") as tmp:
        workdir = Path(options.out) / "logs" if options.keep_logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        peer_default = PeerSetting(None, MAX_BATCH_SIZE, BATCH_TIMEOUT_S)

        def peer_of(setting: PeerSetting):
            return peer_server(with_threads(args, setting.threads), port=options.peer_port, workdir=workdir,
                               max_batch_size=setting.max_batch_size, batch_timeout_s=setting.batch_timeout_s)

        def baseline_of(setting: PeerSetting):
            return baseline_server(with_threads(args, setting.threads), port=options.baseline_port, workdir=workdir)

        chosen = {"baseline": peer_default, "peer": peer_default}  # until calibrated
        factories = {
            "baseline": lambda: baseline_of(chosen["baseline"]),
            "graph": lambda: graph_server(config, args, port=options.graph_port, workdir=workdir, env=graph_env),
            "peer": lambda: peer_of(chosen["peer"]),
        }
        knobs = {"peer": {"threads": options.peer_threads or thread_candidates(cores),
                          "batching": options.peer_batches or plan.peer_batches},
                 "baseline": {"threads": options.baseline_threads or thread_candidates(cores)}}
        for name, make in (("baseline", baseline_of), ("peer", peer_of)):
            if name in wanted:
                chosen[name], tuning[name] = calibrate(name, make, knobs[name], frame_sets["mixed"], plan,
                                                       options.start_timeout, progress)

        servers = {}
        try:
            for name in SYSTEMS:  # the baseline first: its peak sets every system's open-loop rates
                if name not in wanted:
                    continue
                server = factories[name]()
                t = time.perf_counter()
                servers[name] = server.start(options.start_timeout, progress)
                startup = round(time.perf_counter() - t, 1)
                tune.pause(server.process.pid)
                systems[name] = {"startup_s": startup}
            bench = Bench(servers, frame_sets, plan, progress)
            progress(f"bench: {plan.rounds} interleaved round(s) of the headline points "
                     f"({', '.join(servers)}; the others frozen while one is measured)")
            repeated = bench.rounds()
            rates = None
            for name in servers:
                systems[name].update(bench.rest(name, repeated[name], rates))
                if name == "baseline":
                    rates = {d == "true": v for d, v in systems[name]["base_rates"].items()}
        finally:
            for server in servers.values():
                tune.resume(server.process.pid)
                server.stop()

    micro, efficiency = [], {}
    if not options.no_micro:
        from festival_serve.measure.bench.efficiency import model_cpu_per_frame

        progress("bench: the models' own CPU per frame (in-process, one thread, at their best batch)")
        efficiency = model_cpu_per_frame(args, frame_sets, batch_sizes=list(plan.micro_batches),
                                         repeats=plan.micro_repeats, progress=progress)
        from festival_serve.training.standins.store import RECIPE, default_cache, smolvlm_stand_in

        # The real SmolVLM's cost, beside the served describer's (the same model when nothing is trained).
        cost_model = args.scene_describer.model_copy(update={"model": str(smolvlm_stand_in(
            (options.stand_ins or default_cache()) / f"recipe-{RECIPE}", progress=progress)),
            "max_new_tokens": plan.new_tokens})
        micro = run_micro(args, batch_sizes=list(plan.micro_batches), vlm_batch_sizes=list(plan.vlm_batches),
                          threads=None, repeats=plan.micro_repeats, min_seconds=plan.micro_min_s, progress=progress,
                          describer_cost_model=cost_model)

    result = {
        "mode": plan.mode,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cuda": cuda_available(), "python": platform.python_version(),
                    "platform": platform.platform(terse=True), **package_versions(("ray", "torch", "onnxruntime", "transformers", "ultralytics"))},
        "plan": asdict(plan),
        "graph_env": graph_env,
        "tuning": tuning,
        "schedule": bench.schedule if systems else [],
        "models": [{**asdict(s), "path": portable_path(s.path)} for s in sources],
        "systems": systems,
        "micro": micro,
        "efficiency": efficiency,
        "summary": summarize(systems, efficiency),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    report.write(result, Path(options.out))
    return result


def held_out_frames(count: int, progress) -> dict[str, list[bytes]]:
    """JPEGs of held-out scenes (test split): ``count`` as they come ("mixed"), and ``count`` each of scenes
    with a sign that prints text ("text_signs") and scenes without ("no_text"), drawn from the same split."""
    from festival_serve.serving.imaging import encode_jpeg
    from festival_serve.world.synth import TEXT_CLASSES, generate_scene, scene_seeds

    sets: dict[str, list[bytes]] = {name: [] for name in FRAME_SETS}
    for k, seed in enumerate(scene_seeds("test", count * 8)):
        scene = generate_scene(seed)
        frames = "text_signs" if any(sign.sign_class in TEXT_CLASSES for sign in scene.signs) else "no_text"
        wanted = [name for name in (("mixed",) if k < count else ()) + (frames,) if len(sets[name]) < count]
        if wanted:
            body = encode_jpeg(scene.image)
            for name in wanted:
                sets[name].append(body)
        if all(len(v) >= count for v in sets.values()):
            break
    progress("  held-out 848x480 scenes as JPEG (test split): " + ", ".join(f"{len(v)} {k}" for k, v in sets.items()))
    return sets


def portable_path(path: str) -> str:
    """``path`` as it can be published: relative to the working directory, or under ``~``."""
    candidate = Path(path)
    if not candidate.is_absolute():
        return path
    for base, shown in ((Path.cwd(), ""), (Path.home(), "~")):
        try:
            relative = candidate.relative_to(base)
        except ValueError:
            continue
        return str(Path(shown) / relative) if shown else str(relative)
    return path


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` strings → a dict (Ray hands the driver's environment to every process it starts)."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--graph-env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def cmd_bench(options: argparse.Namespace) -> int:
    from festival_serve.measure.bench.servers import ServerFailed

    try:
        result = run(options)
    except (ServerFailed, RuntimeError, ValueError) as e:
        print(f"festival-serve bench: {e}", file=sys.stderr)
        return 1
    summary = result["summary"]
    print(f"\nbench ({result['mode']}) finished in {result['elapsed_s']:.0f} s; report in {options.out}/")
    for key in TARGETS:
        met = summary["targets_met"].get(key)
        verdict = "" if met is None else ("  (target met)" if met else f"  (target {TARGETS[key]}: MISSED)")
        print(f"  {key:28} {summary.get(key)}{verdict}")
    print(json.dumps({"mode": result["mode"], **{k: v for k, v in summary.items() if k not in ("targets",)}}))
    return 0
