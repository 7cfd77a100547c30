"""``festival-serve load``: drive a running graph through a festival day (``festival_serve.measure.load_profiles``)
and record, per second, what it was offered and what it answered, and how many replicas each deployment
ran meanwhile.

    festival-serve load --profile festival --duration 600          # against http://127.0.0.1:8000
    festival-serve load --profile surge --capacity 20 --duration 120 --out /tmp/load
    festival-serve load --profile surge --kill-node-at 50 --kill-replica-at 90     # on `cluster local up`
    festival-serve load --profile festival --update-user-config-at 120 --update-args-at 200
    festival-serve load --hostile                   # hostile clients beside a normal one (festival_serve.measure.hostile)

Open-loop Poisson arrivals follow the profile's rate (a multiple of ``--capacity``; without it, a 10 s
closed-loop probe at 16 clients measures it first); every request carries ``--budget`` seconds in
``x-request-timeout-seconds``. The client runs in a process of its own (at ~100 req/s it must keep its
schedule); this process polls Serve's status API once a second for replica counts (``--ray-address``:
the local cluster's, else ``auto``). Writes ``<out>/<profile>.json`` (per-second rows and a summary) and
``<out>/<profile>.png`` (offered/answered rate and p95 on top, replicas per deployment below).

On a local cluster (``festival-serve cluster local up``) it also disrupts the run as planned
(``festival_serve.measure.faults``): kills a worker node or a replica (SIGKILL), or redeploys the cluster's
config with a ``user_config`` or an ``args`` value changed (a rolling update), and reports every answer by
outcome from then until goodput recovered (``fault_report``).

``--hostile`` runs something else: a normal client's goodput and p95 through a quiet phase, one attack after another
(slow bodies, slow headers, idle connections, JPEG scan bombs, 40 MP PNGs) and quiet again, against targets
(``festival_serve.measure.hostile``); it writes ``<out>/hostile.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from festival_serve.measure import hostile, loadgen
from festival_serve.measure.faults import KILLS, UPDATES, Fault, FaultInjector
from festival_serve.measure.load_profiles import BUILT_IN, Profile, load_profile

#: Seconds between progress lines on the terminal.
PROGRESS_EVERY_S = 10.0


def measure_capacity(url: str, bodies: list[bytes], *, seconds: float = 10.0, clients: int = 16) -> float:
    """Goodput (answers without a degraded stage, per s) of a short closed loop at ``clients``: the rate the
    profile's multiples scale."""
    result = asyncio.run(loadgen.closed_loop(url, bodies, concurrency=clients, duration_s=seconds, describe=False,
                                             warmup_s=2.0, timeout_s=120))
    return result.goodput_rps()


def run_profile(url: str, bodies: list[bytes], points: tuple, capacity_rps: float, duration_s: float,
                budget_s: float, seed: int = 0, start_at: float | None = None) -> dict:
    """One run of the profile ``points`` (in the client's own process), starting at wall-clock ``start_at`` (so
    that faults injected from another process land when planned): every request's record and the run's
    wall-clock start, so replica samples taken elsewhere line up with it."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    profile = Profile("run", points)
    rate = profile.rate(capacity_rps, duration_s)
    started_wall = time.time()
    result = asyncio.run(loadgen.overload(url, bodies, rate=rate, duration_s=duration_s, budget_s=budget_s, seed=seed,
                                          progress=lambda result: _progress(result, rate, duration_s)))
    return {"started": started_wall, "records": result.records, "summary": result.summary()}


async def _progress(result: loadgen.OverloadResult, rate, duration_s: float) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        now = time.perf_counter() - result.began
        recent = [r for r in result.records if now - PROGRESS_EVERY_S <= r[0] < now]
        answered = sorted(r[2] for r in recent if r[1] in loadgen.ANSWERED)
        shed = sum(1 for r in recent if r[1].startswith("shed"))
        p95 = f"{answered[int(0.95 * (len(answered) - 1))] * 1000:6.0f} ms" if answered else "     – ms"
        print(f"  t={now:5.0f}/{duration_s:.0f} s  offered {rate(now):6.1f}/s  answered {len(answered) / PROGRESS_EVERY_S:5.1f}/s"
              f"  refused {shed / PROGRESS_EVERY_S:5.1f}/s  p95 {p95}  (requests sent in the last "
              f"{PROGRESS_EVERY_S:g} s that have come back)", flush=True)


class ReplicaSampler:
    """Replica counts per deployment (Serve's status API), once a second, in a thread of this process."""

    def __init__(self, address: str | None, app: str) -> None:
        self.address, self.app = address, app
        self.samples: list[tuple[float, dict[str, int]]] = []  # (wall-clock s, deployment → running replicas)
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replica-sampler")

    def start(self) -> "ReplicaSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from festival_serve.ops import up

        host = (self.address or "auto").rpartition("://")[2].rsplit(":", 1)[0]
        if host == "auto" or up.is_loopback(host):
            up.apply_local_ray_env()  # a loopback node is reachable only in Ray's local-only mode, set before import
        try:
            import ray
            from ray import serve

            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - replica counts are optional; say why they are missing
            self.error = f"cannot connect to Ray at {self.address}: {type(e).__name__}: {e}"
            return
        try:
            while not self._stop.is_set():
                try:
                    app = serve.status().applications.get(self.app)
                    if app is not None:
                        self.samples.append((time.time(), {
                            name: int(status.replica_states.get("RUNNING", 0))
                            for name, status in app.deployments.items()}))
                except Exception as e:  # noqa: BLE001 - a missed sample is a gap in the plot, not a failed run
                    self.error = f"serve.status() failed: {type(e).__name__}: {e}"
                self._stop.wait(1.0)
        finally:
            ray.shutdown()


def fault_report(rows: list[dict], event: dict, *, before_s: int = 20, settle: float = 0.9,
                 window_s: int = 5) -> dict:
    """What a fault did: answers by outcome from it until goodput recovered, and how long that took: the first
    second from which the mean goodput over ``window_s`` seconds is back to ``settle`` of the median of the
    ``before_s`` seconds before it (None if it never was within the run)."""
    import statistics

    start = int(event["t"])
    good = [row.get("good", 0) for row in rows]
    baseline = statistics.median(good[max(0, start - before_s):start] or [0])
    recovered = next((s for s in range(start, len(rows) - window_s + 1)
                      if sum(good[s:s + window_s]) / window_s >= settle * baseline), None)
    end = recovered if recovered is not None else len(rows)
    report = {**event, "goodput_before_rps": baseline, "recovery_s": None if recovered is None else recovered - start,
              "outcomes_until_recovered": _outcomes(rows[start:max(end, start + 1)])}
    if event.get("rollout_s") is not None:  # an update: every answer while Serve rolled it out (and the second after)
        report["outcomes_during_rollout"] = _outcomes(rows[start:start + int(event["rollout_s"]) + 2])
    return report


def _outcomes(rows: list[dict]) -> dict[str, int]:
    return {key: sum(row.get(key, 0) for row in rows)
            for key in ("sent", "good", "answered_not_good", "shed_fast", "shed_slow", "error", "lost", "hung",
                        "degraded")}


def per_second(run: dict, replica_samples: list[tuple[float, dict[str, int]]], duration_s: float,
               rate) -> list[dict]:
    """The run's timeline (by second of arrival) with the offered rate and the replicas then."""
    result = loadgen.OverloadResult(0.0, 0.0, False, records=[tuple(r) for r in run["records"]])
    rows = {row["second"]: row for row in result.timeline()}
    out = []
    for second in range(int(duration_s)):
        row = {"second": second, "offered_rps": round(rate(second + 0.5), 2), "sent": 0,
               **rows.get(second, {})}
        wall = run["started"] + second
        before = [counts for t, counts in replica_samples if t <= wall + 1]
        if before:
            row["replicas"] = before[-1]
        out.append(row)
    return out


def summarize(rows: list[dict], run_summary: dict) -> dict:
    deployments = sorted({name for row in rows for name in row.get("replicas", {})})
    count = _outcomes(rows)
    return {
        **count,
        "answered": count["good"] + count["answered_not_good"],
        "shed": count["shed_fast"] + count["shed_slow"],
        "max_replicas": {name: max(row.get("replicas", {}).get(name, 0) for row in rows) for name in deployments},
        "min_replicas": {name: min(row["replicas"][name] for row in rows if name in row.get("replicas", {}))
                         for name in deployments},
        "p50_ms": run_summary.get("p50_ms"), "p99_ms": run_summary.get("p99_ms"),
        # Shares of all responses / of all refusals, as the bench's overload section reports them.
        "within_budget_share": run_summary.get("within_budget"),
        "refused_fast_with_retry_after_share": run_summary.get("shed_fast"),
    }


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rows = report["seconds"]
    t = [row["second"] for row in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 2))
    top.plot(t, [row["offered_rps"] for row in rows], label="offered req/s", color="grey")
    top.plot(t, [row.get("good", 0) + row.get("answered_not_good", 0) for row in rows], label="answered (200) req/s")
    top.plot(t, [row.get("shed_fast", 0) + row.get("shed_slow", 0) for row in rows], label="refused (429/503) req/s",
             alpha=0.6)
    top.set_ylabel("requests per second (by second sent)")
    latency = top.twinx()
    latency.plot(t, [row.get("p95_ms") for row in rows], color="black", linestyle=":", label="p95 of answers (ms)")
    latency.set_ylabel("p95 latency of answers, ms")
    lines, labels = top.get_legend_handles_labels()
    more, more_labels = latency.get_legend_handles_labels()
    top.legend(lines + more, labels + more_labels, loc="upper left", fontsize=8)
    top.set_title(f"festival-serve load --profile {report['profile']} (capacity {report['capacity_rps']:g} req/s, "
                  f"budget {report['budget_s']:g} s)")
    for name in sorted(report["summary"]["max_replicas"]):
        bottom.step(t, [row.get("replicas", {}).get(name) for row in rows], where="post", label=name)
    most = max(report["summary"]["max_replicas"].values(), default=1)
    bottom.set_ylim(0, most + 1)
    bottom.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for event in report.get("faults", []) + report.get("updates", []):
        killed = event["kind"] in KILLS
        for axis in (top, bottom):
            axis.axvline(event["t"], color="red" if killed else "blue", linestyle="--", linewidth=1)
        top.annotate(f"{'kill' if killed else 'update'} {event['kind']}", (event["t"], 0),
                     color="red" if killed else "blue", fontsize=8, rotation=90, xytext=(3, 5),
                     textcoords="offset points")
    bottom.set_ylabel("running replicas")
    bottom.set_xlabel("seconds into the run")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--profile", default="festival",
                        help=f"{', '.join(BUILT_IN)}, or a JSON/YAML file of [t, multiple] points (default %(default)s)")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--duration", type=float, default=600, help="seconds the whole profile takes")
    parser.add_argument("--capacity", type=float, help="req/s the profile's multiples scale (default: measured first)")
    parser.add_argument("--budget", type=float, default=2.0, help="x-request-timeout-seconds of every request")
    parser.add_argument("--scenes", type=int, default=16, help="distinct held-out scenes the client cycles")
    parser.add_argument("--ray-address", help="Ray cluster to read replica counts from (default: the local "
                                              "cluster's, else auto; 'none' skips them)")
    parser.add_argument("--app", default="festival", help="Serve application whose replicas are counted")
    parser.add_argument("--kill-node-at", type=float, metavar="S",
                        help="S seconds into the run, kill the worker node of the local cluster that holds the most "
                             "GPU replicas (its raylet and every process of it)")
    parser.add_argument("--kill-replica-at", type=float, metavar="S", help="S seconds in, kill one replica")
    parser.add_argument("--kill-replica", default="SignDetector", help="whose replica (default %(default)s)")
    parser.add_argument("--update-user-config-at", type=float, metavar="S",
                        help="S seconds in, redeploy with a user_config value changed (the detector's batch wait)")
    parser.add_argument("--update-args-at", type=float, metavar="S",
                        help="S seconds in, redeploy with an application args value changed (the detector's "
                             "confidence): a rolling update")
    parser.add_argument("--state-file", default=None, help="the local cluster's state file (faults and updates "
                                                           "need it)")
    parser.add_argument("--compare-with", type=Path, metavar="JSON",
                        help="an earlier run's JSON (e.g. under another `cluster local up --autoscaling`): also plot "
                             "both runs' replicas per deployment as <out>/<profile>-replicas-by-autoscaling.png")
    parser.add_argument("--out", type=Path, default=Path("docs/load"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile", action="store_true",
                        help="instead of a profile: what slow, idle and bomb-sending clients do to a normal client's "
                             "goodput, phase by phase, and how soon it recovers (writes <out>/hostile.json)")
    hostile.add_arguments(parser.add_argument_group("--hostile", "(--url, --budget, --scenes and --out apply too)"))
    return parser


def cmd_load(args: argparse.Namespace) -> int:
    if args.hostile:
        return hostile.cmd_hostile(args)
    from festival_serve.serving.imaging import encode_jpeg
    from festival_serve.world.synth import generate_scene, scene_seeds

    try:
        profile = load_profile(args.profile)
    except ValueError as e:
        print(f"festival-serve load: {e}", file=sys.stderr)
        return 2
    url = f"{args.url.rstrip('/')}/v1/analyze"
    bodies = [encode_jpeg(generate_scene(seed).image) for seed in scene_seeds("test", args.scenes)]
    capacity = args.capacity
    if capacity is None:
        print("festival-serve load: measuring capacity (10 s at 16 clients) …", flush=True)
        capacity = measure_capacity(url, bodies)
    if capacity <= 0:
        print("festival-serve load: no capacity (the server answered nothing useful); is it running?", file=sys.stderr)
        return 1
    from festival_serve.ops.local_cluster import DEFAULT_STATE_FILE

    planned = {"node": args.kill_node_at, "replica": args.kill_replica_at, "user_config": args.update_user_config_at,
               "args": args.update_args_at}
    faults = [Fault(at, kind, args.kill_replica) for kind, at in planned.items() if at is not None]
    state_file = Path(args.state_file or DEFAULT_STATE_FILE).expanduser()
    if faults and not state_file.exists():
        print(f"festival-serve load: faults and updates need a local cluster (`festival-serve cluster local up`); "
              f"no state in "
              f"{state_file}", file=sys.stderr)
        return 2
    # Replica counts (and faults) come from the local cluster's Ray when one is up, else from a local `up`'s.
    address = args.ray_address or (json.loads(state_file.read_text())["address"] if state_file.exists() else "auto")
    if faults and address == "none":
        print("festival-serve load: faults and updates need the Ray connection (drop --ray-address none)",
              file=sys.stderr)
        return 2
    sampler = ReplicaSampler(address, args.app).start() if address != "none" else None
    print(f"festival-serve load: profile {profile.name}, {args.duration:g} s, capacity {capacity:.1f} req/s "
          f"(peak {capacity * profile.peak():.1f} req/s), budget {args.budget:g} s"
          + "".join(f"; {'update' if f.kind in UPDATES else 'kill'} {f.kind} at {f.at_s:g} s" for f in faults),
          flush=True)
    start_at = time.time() + 5.0  # the client process starts in ~2 s; faults are timed from the same instant
    injector = FaultInjector(faults, state_file, start_at).start() if faults else None
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
            run = client.submit(run_profile, url, bodies, profile.points, capacity, args.duration, args.budget,
                                args.seed, start_at).result()
        after = []
        if injector:
            injector.join()
            time.sleep(5.0)  # the last replica samples; then where the replicas are now
            from festival_serve.ops.local_cluster import placements

            after = [{"deployment": r.deployment, "node": r.node_id[:8], "gpu": r.gpu} for r in placements()]
    finally:
        if sampler:
            sampler.stop()
    if sampler and sampler.error:
        print(f"festival-serve load: no replica counts: {sampler.error}", file=sys.stderr)
    rows = per_second(run, sampler.samples if sampler else [], args.duration, profile.rate(capacity, args.duration))
    cluster_profile = json.loads(state_file.read_text()).get("profile", {}) if state_file.exists() else {}
    report = {"profile": profile.name, "points": profile.points, "duration_s": args.duration,
              "capacity_rps": round(capacity, 3), "budget_s": args.budget, "url": args.url,
              "autoscaling": cluster_profile.get("autoscaling"),  # the local cluster's --autoscaling, if any
              "summary": summarize(rows, run["summary"]), "seconds": rows}
    if injector:
        events = [fault_report(rows, event) for event in injector.events]
        report["faults"] = [event for event in events if event["kind"] in KILLS]
        report["updates"] = [event for event in events if event["kind"] in UPDATES]
        report["placements_after"] = after
        report["summary"]["recovery_s"] = {event["kind"]: event.get("recovery_s") for event in events}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = profile.name + ("-faults" if any(f.kind in KILLS for f in faults) else "") + \
        ("-updates" if any(f.kind in UPDATES for f in faults) else "")
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1))
    png = plot(report, args.out / f"{stem}.png")
    print(f"festival-serve load: wrote {json_path}" + (f" and {png}" if png else ""))
    if args.compare_with:
        other = json.loads(args.compare_with.read_text())
        both = plot_replicas({_label(report, json_path): report, _label(other, args.compare_with): other},
                             args.out / f"{stem}-replicas-by-autoscaling.png")
        if both:
            print(f"festival-serve load: wrote {both}")
    print(json.dumps(report["summary"]))
    return 0


def _label(report: dict, path: Path) -> str:
    return f"{report.get('autoscaling') or 'autoscaling?'} ({path})"


def plot_replicas(reports: dict[str, dict], path: Path) -> Path | None:
    """Replicas per deployment over the run, one panel per deployment, one line per run (e.g. the graph's own
    autoscaling metrics against Serve's queue-length rule), the offered rate shaded behind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    deployments = sorted({name for report in reports.values() for name in report["summary"]["max_replicas"]})
    if not deployments:  # runs without replica counts (--ray-address none)
        return None
    fig, axes = plt.subplots(len(deployments), 1, figsize=(10, 1.8 * len(deployments) + 1), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    for axis, name in zip(axes, deployments):
        offered = axis.twinx()
        first = next(iter(reports.values()))["seconds"]
        offered.fill_between([row["second"] for row in first], [row["offered_rps"] for row in first], color="grey",
                             alpha=0.15, step="post")
        offered.set_yticks([])
        for label, report in reports.items():
            rows = report["seconds"]
            axis.step([row["second"] for row in rows], [row.get("replicas", {}).get(name) for row in rows],
                      where="post", label=f"{label} (max {report['summary']['max_replicas'].get(name, 0)})")
        axis.set_ylabel(name, fontsize=8)
        axis.set_ylim(0, max(r["summary"]["max_replicas"].get(name, 0) for r in reports.values()) + 0.5)
        axis.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.legend(loc="upper left", fontsize=7)
    axes[0].set_title("running replicas per deployment (the offered rate shaded)")
    axes[-1].set_xlabel("seconds into the run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
