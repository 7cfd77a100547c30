"""``festival-serve bench --streams N``: the camera-stream API (``WS /v1/streams``, live mode) against the
per-image API (``POST /v1/analyze``) on the same frames, in one run, then the streams at a multiple of the
capacity (issue 31, item 8).

Phases, each with the CPU of the server's whole process tree sampled (``procstats.TreeSampler``):

1. streams: N synthetic cameras (held-out clips, pre-rendered and JPEG-encoded once, looped), each a live
   WebSocket sending on a clock at F fps for S seconds whatever comes back (a live camera does not wait);
2. per-image: the same frames POSTed one by one by N closed-loop clients for S seconds;
3. overload: ``multiple`` x the measured capacity offered (more streams at F fps; the capacity is the larger
   of the two phases' frames/s unless ``--stream-capacity`` gives it) for ``--stream-overload-seconds``.

The clients run in a process of their own (spawned), as run.py's overload client does: the sampler's thread
holds this process's GIL for tens of ms per sample, which would show up as the client's round trip.

Latency of a stream frame: the server's arrival -> result (``timings_ms`` total + queued), with the client's
round trip (send -> result received) beside it. The targets are judged on the server's.

The pure parts (percentiles, windows, fairness, the fair share, ratios, targets, the report) take plain
numbers, so ``tests/test_bench_streams.py`` checks them without Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import median

import numpy as np

from festival_serve.ops.watch import STREAM_HEADERS

#: Targets of issue 31 item 8: (value key, target, "min" = a floor / "max" = a ceiling, what it means).
STREAM_TARGETS = {
    "per_core_ratio": (2.0, "min", "stream frames/s per core / per-image frames/s per core"),
    "streams_p95_ms": (250.0, "max", "stream p95 (arrival -> result) below capacity, ms"),
    "overload_p95_ms": (500.0, "max", "stream p95 at the overload point, ms"),
    "overload_p95_growth": (1.2, "max", "overload p95, last window / first window (not growing)"),
    "overload_fair_share_deviation": (0.2, "max", "worst stream's |processed fps / fair share - 1| at overload"),
}
#: The first and last windows compared at the overload point are this long (at most a third of the run each).
COMPARE_WINDOW_S = 30.0
#: p95 over time is reported in windows of this many seconds (at most a tenth of the run, at least 1 s).
TIMELINE_WINDOW_S = 10.0
#: After ``end`` a stream waits this long for its summary.
SUMMARY_TIMEOUT_S = 15.0


# -- pure parts ------------------------------------------------------------------------------------------


def percentile(values, q: float) -> float | None:
    """The q-th percentile (numpy's linear interpolation), rounded to 0.01; None for no values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(np.percentile(values, q)), 2) if values else None


def fairness(fps: list[float]) -> float | None:
    """min / max processed fps over the streams: 1.0 when every stream got the same; None without streams."""
    if not fps:
        return None
    top = max(fps)
    return round(min(fps) / top, 3) if top > 0 else None


def fair_share(fps: list[float], cap_fps: float) -> float | None:
    """Each stream's fair share of what was processed: the total split evenly, but never more than a stream
    may get (its fps cap: what it offered, or the server's max_fps)."""
    if not fps:
        return None
    return round(min(cap_fps, sum(fps) / len(fps)), 3)


def share_deviations(fps: list[float], cap_fps: float) -> list[float]:
    """Each stream's processed fps / the fair share - 1 (0 is exactly fair)."""
    share = fair_share(fps, cap_fps)
    if not share:
        return []
    return [round(f / share - 1.0, 3) for f in fps]


def windows(samples: list[tuple[float, float]], window_s: float, duration_s: float) -> list[dict]:
    """(time s, latency ms) samples in consecutive windows of ``window_s`` over [0, duration_s): per window
    its start, end, count and p50/p95 (None where it holds nothing). A sample at or after the end goes to the
    last window (a frame sent in the last instant, answered after it)."""
    if window_s <= 0 or duration_s <= 0:
        return []
    count = max(1, math.ceil(duration_s / window_s - 1e-9))
    buckets: list[list[float]] = [[] for _ in range(count)]
    for t, latency in samples:
        buckets[min(count - 1, max(0, int(t // window_s)))].append(latency)
    return [{"start_s": round(k * window_s, 3), "end_s": round(min(duration_s, (k + 1) * window_s), 3),
             "frames": len(b), "p50_ms": percentile(b, 50), "p95_ms": percentile(b, 95)}
            for k, b in enumerate(buckets)]


def first_last(samples: list[tuple[float, float]], duration_s: float,
               span_s: float = COMPARE_WINDOW_S) -> dict:
    """p95 of the first and the last ``span_s`` (at most a third of the run each, so they never overlap) and
    their ratio, last / first: above 1 the latency grew over the run."""
    span = min(span_s, duration_s / 3) if duration_s > 0 else 0.0
    first = [lat for t, lat in samples if t < span]
    last = [lat for t, lat in samples if t >= duration_s - span]
    p_first, p_last = percentile(first, 95), percentile(last, 95)
    growth = round(p_last / p_first, 3) if p_first and p_last is not None else None
    return {"span_s": round(span, 2), "first_p95_ms": p_first, "last_p95_ms": p_last, "p95_growth": growth,
            "first_frames": len(first), "last_frames": len(last)}


def per_core(frames: int | None, cpu_s: float | None) -> float | None:
    """Frames per second per core of CPU the server used: frames per CPU-second. Not frames/s over the sampler's
    mean cores: its window also holds a phase's opening and closing (sockets opening, summaries awaited), where
    few frames flow, and understated the streams' cores by a third (2.6x against 1.8x frames per CPU-second)."""
    if not frames or not cpu_s:
        return None
    return round(frames / cpu_s, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def judge(values: dict) -> dict:
    """Each target's value and whether it is met (None: not measured)."""
    out = {}
    for key, (target, kind, what) in STREAM_TARGETS.items():
        value = values.get(key)
        met = None if value is None else (value >= target if kind == "min" else value <= target)
        out[key] = {"value": value, "target": target, "kind": kind, "what": what, "met": met}
    return out


def stream_phase(streams: list[dict], seconds: float, fps: float, resources: dict | None) -> dict:
    """One streams phase from its cameras' records (``camera``'s dicts): totals, per stream, latency,
    fairness, CPU per frame, reads per track, and latency over time."""
    rows, server_samples, trip_samples, reads, text_reads = [], [], [], [], []
    for s in streams:
        summary = s.get("summary") or {}
        processed = len(s["results"])
        dropped = summary.get("dropped", s.get("dropped_seen", 0))
        rows.append({"camera": s["camera"], "sent": s["sent"], "skipped_ticks": s.get("skipped", 0),
                     "processed": processed, "processed_fps": round(processed / seconds, 3) if seconds else None,
                     "dropped": dropped, "errors": s.get("errors", 0), "refused": s.get("refused"),
                     "closed": s.get("closed"),
                     "server_p95_ms": percentile([r[1] for r in s["results"]], 95),
                     "server_summary": {k: summary.get(k) for k in ("received", "processed", "dropped", "errors",
                                                                      "seconds", "processed_fps", "latency_ms",
                                                                      "reads")} if summary else None})
        server_samples += [(r[0], r[1]) for r in s["results"]]
        trip_samples += [(r[0], r[2]) for r in s["results"]]
        reads += [t.get("reads", 0) for t in summary.get("tracks", [])]
        text_reads += [t.get("reads", 0) for t in summary.get("tracks", []) if t.get("text") or t.get("reads")]
    live = [r for r in rows if not r["refused"]]
    granted = [s["granted_fps"] for s in streams if s.get("granted_fps")]
    cap = min([fps, *granted])  # a stream's most: what it offered, or the server's max_fps if lower
    fps_list = [r["processed_fps"] for r in live if r["processed_fps"] is not None]
    processed = sum(r["processed"] for r in rows)
    sent = sum(r["sent"] for r in rows)
    dropped = sum(r["dropped"] or 0 for r in rows)
    cpu_s = (resources or {}).get("cpu_s")
    cores = (resources or {}).get("cpu_cores")
    total_fps = round(processed / seconds, 3) if seconds else None
    server_lat = [v for _, v in server_samples]
    trip_lat = [v for _, v in trip_samples]
    window = max(1.0, min(TIMELINE_WINDOW_S, seconds / 10)) if seconds else TIMELINE_WINDOW_S
    return {
        "streams": len(streams), "refused": len(streams) - len(live), "offered_fps_per_stream": fps,
        "offered_fps": round(fps * len(streams), 3), "seconds": seconds,
        "sent": sent, "processed": processed, "processed_fps": total_fps, "dropped": dropped,
        "dropped_share": round(dropped / sent, 4) if sent else None,
        "errors": sum(r["errors"] for r in rows),
        "server_p50_ms": percentile(server_lat, 50), "server_p95_ms": percentile(server_lat, 95),
        "roundtrip_p50_ms": percentile(trip_lat, 50), "roundtrip_p95_ms": percentile(trip_lat, 95),
        "fairness_min_max": fairness(fps_list),
        "stream_fps_cap": cap,
        "fair_share_fps": fair_share(fps_list, cap),
        "share_deviations": share_deviations(fps_list, cap),
        "worst_share_deviation": max((abs(d) for d in share_deviations(fps_list, cap)), default=None),
        "cpu_s": cpu_s, "cpu_cores": cores,
        "cpu_ms_per_frame": round(cpu_s * 1000 / processed, 2) if cpu_s is not None and processed else None,
        "fps_per_core": per_core(processed, cpu_s),
        "reads_per_track_median": median(reads) if reads else None, "tracks": len(reads),
        # as ``festival-serve watch`` counts them: over the tracks with text or a read (pictograms are not read)
        "reads_per_text_track_median": median(text_reads) if text_reads else None, "text_tracks": len(text_reads),
        "timeline": windows(server_samples, window, seconds),
        "first_last": first_last(server_samples, seconds),
        "per_stream": rows,
        "resources": resources,
    }


def image_phase(load: dict, resources: dict | None) -> dict:
    """The per-image phase from ``loadgen.LoadResult.summary()`` (+ goodput) and its CPU."""
    cpu_s = (resources or {}).get("cpu_s")
    cores = (resources or {}).get("cpu_cores")
    fps = load.get("throughput_rps")
    return {"clients": load.get("level"), "seconds": load.get("duration_s"), "answered": load.get("ok"),
            "errors": load.get("errors"), "degraded": load.get("degraded"), "frames_per_s": fps,
            "goodput_rps": load.get("goodput_rps"), "p50_ms": load.get("p50_ms"), "p95_ms": load.get("p95_ms"),
            "cpu_s": cpu_s, "cpu_cores": cores,
            "cpu_ms_per_frame": round(cpu_s * 1000 / load["ok"], 2) if cpu_s is not None and load.get("ok") else None,
            "fps_per_core": per_core(load.get("ok"), cpu_s), "error_examples": load.get("error_examples", []),
            "resources": resources}


def overload_layout(capacity_fps: float, multiple: float, fps: float, min_streams: int,
                    max_streams: int) -> tuple[int, float]:
    """(streams, fps each) offering ``multiple`` x ``capacity_fps``: more streams at ``fps`` (at least
    ``min_streams``); where that needs more than ``max_streams``, that many at a higher fps."""
    offered = multiple * capacity_fps
    streams = max(min_streams, math.ceil(offered / fps - 1e-9))
    if streams <= max_streams:
        return streams, fps
    return max_streams, round(offered / max_streams, 3)


def summarize(streams: dict, image: dict, overload: dict | None, capacity: dict) -> dict:
    """The ratios and the targets."""
    values = {
        "per_core_ratio": ratio(streams.get("fps_per_core"), image.get("fps_per_core")),
        "throughput_ratio": ratio(streams.get("processed_fps"), image.get("frames_per_s")),
        "cpu_per_frame_ratio": ratio(image.get("cpu_ms_per_frame"), streams.get("cpu_ms_per_frame")),
        "streams_p95_ms": streams.get("server_p95_ms"),
        "streams_roundtrip_p95_ms": streams.get("roundtrip_p95_ms"),
        "image_p95_ms": image.get("p95_ms"),
        "streams_fairness": streams.get("fairness_min_max"),
        "capacity_fps": capacity.get("fps"), "capacity_from": capacity.get("from"),
        "streams_below_capacity": (streams["offered_fps"] < capacity["fps"]
                                   if capacity.get("fps") and streams.get("offered_fps") is not None else None),
    }
    if overload:
        values.update({
            # Both saturated: the overload's streams against the closed loop (the streams phase below capacity
            # batches less, so its CPU per frame is higher than at load).
            "per_core_ratio_saturated": ratio(overload.get("fps_per_core"), image.get("fps_per_core")),
            "overload_offered_fps": overload.get("offered_fps"),
            "overload_processed_fps": overload.get("processed_fps"),
            "overload_p95_ms": overload.get("server_p95_ms"),
            "overload_roundtrip_p95_ms": overload.get("roundtrip_p95_ms"),
            "overload_p95_growth": overload["first_last"].get("p95_growth"),
            "overload_first_p95_ms": overload["first_last"].get("first_p95_ms"),
            "overload_last_p95_ms": overload["first_last"].get("last_p95_ms"),
            "overload_dropped_share": overload.get("dropped_share"),
            "overload_fair_share_deviation": overload.get("worst_share_deviation"),
            "overload_refused_streams": overload.get("refused"),
        })
    return {**values, "targets": judge(values)}


# -- the report ------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def target_lines(summary: dict) -> list[str]:
    """One line per target: value, target and met / NOT MET (printed and in the report)."""
    lines = []
    for key, t in summary["targets"].items():
        op = "≥" if t["kind"] == "min" else "≤"
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        lines.append(f"{key:32} {_fmt(t['value'], 3):>9}  (target {op} {t['target']:g}: {verdict})")
    return lines


def markdown(result: dict) -> str:
    s, st, im, ov = result["summary"], result["streams"], result["image"], result.get("overload")
    machine = result["machine"]
    lines = [f"# festival-serve bench --streams, {result['date']}", "",
             f"Machine: {machine['cpus']} CPUs, Python {machine['python']}. Server: {result['server']} "
             f"({'started by the bench' if result['started_server'] else 'already running'}; CPU sampled over "
             f"its process tree from pid {result['server_pid']}). Whole run: {result['elapsed_s']:.0f} s.", "",
             f"Frames: {result['plan']['clips']} held-out synthetic clips of {result['plan']['clip_frames']} frames "
             f"(848x480, JPEG once up front), looped; stream k shows clip k mod {result['plan']['clips']}.", "",
             "## Targets (issue 31, item 8)", "", "| metric | value | target | met |", "| --- | --- | --- | --- |"]
    for key, t in s["targets"].items():
        op = "≥" if t["kind"] == "min" else "≤"
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {key} ({t['what']}) | {_fmt(t['value'], 3)} | {op} {t['target']:g} | {met} |")
    lines += ["", f"Capacity taken as {_fmt(s['capacity_fps'], 2)} frames/s ({s['capacity_from']}); the streams "
                  f"phase offered {_fmt(st['offered_fps'], 1)} frames/s (below capacity: "
                  f"{_fmt(s['streams_below_capacity'])}). Latencies are the server's arrival -> result "
                  "(timings_ms total + queued); the client's round trip is beside them.", "",
              "## Streams against per-image", "",
              "| phase | load | frames/s | p50 ms | p95 ms | round trip p50 / p95 ms | dropped | CPU cores | "
              "CPU ms / frame | frames/s per core |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in (("streams", st), ("overload", ov)):
        if p:
            lines.append(f"| {name} | {p['streams']} streams x {_fmt(p['offered_fps_per_stream'], 1)} fps, "
                         f"{p['seconds']:g} s | {_fmt(p['processed_fps'], 2)} | {_fmt(p['server_p50_ms'])} | "
                         f"{_fmt(p['server_p95_ms'])} | {_fmt(p['roundtrip_p50_ms'])} / {_fmt(p['roundtrip_p95_ms'])} | "
                         f"{p['dropped']} ({_fmt(p['dropped_share'], 3)}) | {_fmt(p['cpu_cores'], 2)} | "
                         f"{_fmt(p['cpu_ms_per_frame'])} | {_fmt(p['fps_per_core'], 2)} |")
        if name == "streams":
            lines.append(f"| per-image | {im['clients']} closed-loop clients, {_fmt(im['seconds'], 1)} s | "
                         f"{_fmt(im['frames_per_s'], 2)} | {_fmt(im['p50_ms'])} | {_fmt(im['p95_ms'])} | – | – | "
                         f"{_fmt(im['cpu_cores'], 2)} | {_fmt(im['cpu_ms_per_frame'])} | {_fmt(im['fps_per_core'], 2)} |")
    lines += ["", f"Ratios: frames/s per core streams / per-image {_fmt(s['per_core_ratio'], 3)} (the overload's "
                  f"saturated streams / per-image: {_fmt(s.get('per_core_ratio_saturated'), 3)}); frames/s "
                  f"{_fmt(s['throughput_ratio'], 3)}; CPU per frame per-image / streams {_fmt(s['cpu_per_frame_ratio'], 3)}. "
                  f"Streams fairness (min / max processed fps): {_fmt(st['fairness_min_max'], 3)}. Reader calls per "
                  f"track (median over {st['tracks']} tracks): {_fmt(st['reads_per_track_median'])}; over the "
                  f"{st['text_tracks']} tracks with text or a read: {_fmt(st['reads_per_text_track_median'])}.", ""]
    for name, p in (("streams", st), ("overload", ov)):
        if not p:
            continue
        fl = p["first_last"]
        lines += [f"## {name}: every stream", "",
                  f"Fair share {_fmt(p['fair_share_fps'], 2)} fps (a stream's most: "
                  f"{_fmt(p['stream_fps_cap'], 2)} fps); first {fl['span_s']:g} s p95 "
                  f"{_fmt(fl['first_p95_ms'])} ms, last {fl['span_s']:g} s p95 {_fmt(fl['last_p95_ms'])} ms "
                  f"(growth {_fmt(fl['p95_growth'], 3)}).", "",
                  "| camera | sent | processed | processed fps | vs fair share | dropped | errors | p95 ms | "
                  "refused / closed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        deviations = iter(p["share_deviations"])
        for r in p["per_stream"]:
            dev = None if r["refused"] else next(deviations, None)
            lines.append(f"| {r['camera']} | {r['sent']} | {r['processed']} | {_fmt(r['processed_fps'], 2)} | "
                         f"{'–' if dev is None else f'{dev:+.1%}'} | {r['dropped']} | {r['errors']} | "
                         f"{_fmt(r['server_p95_ms'])} | {r['refused'] or r['closed'] or ''} |")
        lines += ["", "| window s | frames | p50 ms | p95 ms |", "| --- | --- | --- | --- |"]
        lines += [f"| {w['start_s']:g}–{w['end_s']:g} | {w['frames']} | {_fmt(w['p50_ms'])} | {_fmt(w['p95_ms'])} |"
                  for w in p["timeline"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> dict[str, Path]:
    """``streams.json`` (everything) and ``streams.md`` under ``out``; ``latest.json`` is the main bench's."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "streams.json", "markdown": out / "streams.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    return paths


# -- the clients (in a spawned process) ------------------------------------------------------------------


async def camera(url: str, jpegs: list[bytes], *, fps: float, seconds: float, start_at: float, first: int,
                 camera_name: str) -> dict:
    """One live camera: connects, sends ``jpegs`` (looped from ``first``) on a clock at ``fps`` from
    ``start_at`` (monotonic) for ``seconds``, whatever comes back; then ``end`` and the summary. Each result
    is (send time since start_at s, server arrival -> result ms, round trip ms)."""
    import websockets

    record = {"camera": camera_name, "sent": 0, "skipped": 0, "results": [], "errors": 0, "dropped_seen": 0,
              "summary": None, "refused": None, "closed": None, "granted_fps": None}
    sent_at: dict[int, float] = {}
    period = 1.0 / fps
    try:
        async with websockets.connect(url, max_size=2 ** 24, open_timeout=30, additional_headers=STREAM_HEADERS) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") == "refused":
                record["refused"] = f"refused: {ready.get('message')} (retry after {ready.get('retry_after_s')} s)"
                return record
            ack_every = max(1, int(ready.get("max_unacked_results", 64)) // 4)
            record["granted_fps"] = ready.get("fps")  # what was asked, capped at the server's max_fps
            done = asyncio.Event()

            async def receive() -> None:
                acked = 0
                async for raw in ws:
                    message = json.loads(raw)
                    kind = message.get("type")
                    if kind == "frame":
                        now = time.monotonic()
                        sent = sent_at.pop(message.get("id"), None)
                        timings = message.get("timings_ms") or {}
                        server_ms = (timings.get("total") or 0.0) + (timings.get("queued") or 0.0)
                        if sent is not None:
                            record["results"].append((round(sent - start_at, 4), round(server_ms, 2),
                                                      round((now - sent) * 1000, 2)))
                        record["dropped_seen"] = message.get("dropped", 0)
                        if message["seq"] - acked >= ack_every:
                            acked = message["seq"]
                            await ws.send(json.dumps({"ack": acked}))
                    elif kind == "frame_error":
                        record["errors"] += 1
                    elif kind == "summary":
                        record["summary"] = message
                        done.set()
                        return

            receiver = asyncio.create_task(receive())
            delay = start_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tick = 0
            ticks = max(1, round(seconds * fps))
            while tick < ticks and not receiver.done():
                now = time.monotonic()
                due = start_at + tick * period
                if now < due:
                    await asyncio.sleep(due - now)
                elif now - due >= period:  # the client fell behind: a live camera's missed frames are gone
                    behind = min(ticks - tick, int((now - due) / period))
                    record["skipped"] += behind
                    tick += behind
                    if tick >= ticks:
                        break
                body = jpegs[(first + tick) % len(jpegs)]
                sent_at[tick] = time.monotonic()
                await ws.send(json.dumps({"id": tick, "t": round(tick * period, 4)}))
                await ws.send(body)
                record["sent"] += 1
                if len(sent_at) > 256:  # the server dropped these: stop waiting for them
                    for key in sorted(sent_at)[:len(sent_at) - 256]:
                        sent_at.pop(key)
                tick += 1
            if not receiver.done():
                await ws.send(json.dumps({"type": "end"}))
                try:
                    await asyncio.wait_for(done.wait(), SUMMARY_TIMEOUT_S)
                except asyncio.TimeoutError:
                    record["closed"] = f"no summary within {SUMMARY_TIMEOUT_S:g} s"
            receiver.cancel()
    except websockets.ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else 1006
        record["closed"] = f"closed {code} {e.rcvd.reason if e.rcvd else ''}".strip()
    except (OSError, asyncio.TimeoutError, websockets.InvalidStatus) as e:
        record["refused"] = f"{type(e).__name__}: {e}"[:200]
    return record


async def cameras(url_of, clips: list[list[bytes]], *, streams: int, fps: float, seconds: float) -> list[dict]:
    """``streams`` cameras at once; stream k shows clip k mod len(clips), its first frame staggered so the
    clips' loops are out of step, its clock phase-shifted by k / streams of a period (cameras are not
    synchronised)."""
    start_at = time.monotonic() + 2.0  # every socket open before the first frame
    return list(await asyncio.gather(*(
        camera(url_of(k), clips[k % len(clips)], fps=fps, seconds=seconds,
               start_at=start_at + (k / streams) / fps, first=(k // len(clips)) * 7, camera_name=f"bench-{k}")
        for k in range(streams))))


def _streams_point(server: str, clips: list[list[bytes]], streams: int, fps: float, seconds: float) -> list[dict]:
    from festival_serve.ops.watch import stream_url

    def url_of(k: int) -> str:
        return stream_url(server, mode="live", fps=fps, describe=False, camera=f"bench-{k}")

    return asyncio.run(cameras(url_of, clips, streams=streams, fps=fps, seconds=seconds))


def _image_point(server: str, bodies: list[bytes], clients: int, seconds: float, warmup_s: float) -> dict:
    from festival_serve.measure import loadgen

    result = asyncio.run(loadgen.closed_loop(f"{server.rstrip('/')}/v1/analyze", bodies, concurrency=clients,
                                             duration_s=seconds, describe=False, warmup_s=warmup_s, timeout_s=120))
    return {**result.summary(), "goodput_rps": result.goodput_rps()}


# -- the run ---------------------------------------------------------------------------------------------


def clip_jpegs(count: int, frames: int, fps: float, progress) -> list[list[bytes]]:
    """``count`` held-out clips (test split) of ``frames`` frames, each frame JPEG-encoded once."""
    from festival_serve.serving.imaging import encode_jpeg
    from festival_serve.world.synth.clips import clip_seeds, generate_clip

    started = time.perf_counter()
    out = [[encode_jpeg(f.image) for f in generate_clip(seed, frames=frames, fps=fps).frames]
           for seed in clip_seeds("test", count)]
    progress(f"  {count} held-out clips x {frames} frames as JPEG ({time.perf_counter() - started:.1f} s, "
             f"{sum(map(len, (b for c in out for b in c))) / max(1, count * frames) / 1024:.0f} KiB a frame)")
    return out


def server_root_pid(server: str) -> int | None:
    """The pid whose process tree is the server at ``server``'s port: the process listening there (Serve's
    proxy), then up its parents to the ``festival-serve`` driver that started Ray. None if not found here."""
    import psutil
    from urllib.parse import urlsplit

    from festival_serve.measure.procstats import process_label

    port = urlsplit(server if "://" in server else f"http://{server}").port or 80
    try:
        listening = [c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid]
    except psutil.AccessDenied:
        return None
    if not listening:
        return None
    proc = psutil.Process(listening[0])
    try:
        for ancestor in [proc, *proc.parents()]:
            if process_label(ancestor) == "driver":
                return ancestor.pid
    except psutil.NoSuchProcess:
        return None
    return proc.pid  # no driver above it (a server started otherwise): its own tree


def _sampled(root_pid: int | None, client, fn, *args):
    """Run ``fn(*args)`` in the client process while the server's tree is sampled: (result, resources)."""
    from festival_serve.measure.procstats import TreeSampler

    sampler = TreeSampler(root_pid).start() if root_pid else None
    try:
        result = client.submit(fn, *args).result()
    finally:
        if sampler:
            sampler.stop()
    return result, (sampler.summary() if sampler else None)


def _phase_line(name: str, p: dict) -> str:
    return (f"  {name:9} {p['streams']} streams x {p['offered_fps_per_stream']:g} fps: {p['processed_fps']} "
            f"frames/s processed, dropped {p['dropped']} ({p['dropped_share']}), p50 {p['server_p50_ms']} ms "
            f"p95 {p['server_p95_ms']} ms (round trip p95 {p['roundtrip_p95_ms']} ms), fairness "
            f"{p['fairness_min_max']}, cpu {p['cpu_cores']} cores, {p['cpu_ms_per_frame']} ms/frame, "
            f"reads/track {p['reads_per_track_median']} (text tracks {p['reads_per_text_track_median']}), "
            f"errors {p['errors']}, refused {p['refused']}")


def run_streams(options: argparse.Namespace, progress=print) -> dict:
    started = time.perf_counter()
    server, started_server, root_pid = options.server, None, getattr(options, "server_pid", None)
    with tempfile.TemporaryDirectory(prefix="festival-bench-streams-") as tmp:
        if server is None:
            started_server = _start_graph(options, Path(tmp), progress)
            server, root_pid = started_server.url, started_server.process.pid
        elif root_pid is None:
            root_pid = server_root_pid(server)
        if root_pid is None:
            progress(f"bench --streams: no process found serving {server} here: CPU is not measured "
                     "(pass --server-pid)")
        try:
            result = _run_phases(server, root_pid, options, progress)
        finally:
            if started_server is not None:
                started_server.stop()
    result.update({"server": server, "started_server": started_server is not None, "server_pid": root_pid,
                   "elapsed_s": round(time.perf_counter() - started, 1)})
    write_report(result, Path(options.out))
    return result


def _start_graph(options: argparse.Namespace, workdir: Path, progress):
    """The graph as run.py starts it: ``festival-serve up`` on the config with the bench's models."""
    from festival_serve.measure.bench import run as bench_run
    from festival_serve.measure.bench.servers import graph_server
    from festival_serve.ops.up import load_config
    from festival_serve.runtime.devices import cuda_available

    plan = bench_run.plan_from(options, cuda=cuda_available())
    config = load_config(options.config)
    args, sources = bench_run.bench_args(config, options, plan, progress)
    for source in sources:
        progress(f"  {source.stage:16} {source.kind:9} {source.path}")
    graph = graph_server(config, args, port=options.graph_port, workdir=workdir,
                         env=bench_run._env_pairs(options.graph_env))
    return graph.start(options.start_timeout, progress)


def _run_phases(server: str, root_pid: int | None, options: argparse.Namespace, progress) -> dict:
    n, fps, seconds = options.streams, options.stream_fps, options.stream_seconds
    progress(f"bench --streams: {n} streams x {fps:g} fps x {seconds:g} s against {server}")
    clips = clip_jpegs(n, options.stream_clip_frames, fps, progress)
    # Client k of the closed loop sends bodies k, k + n, …: clip k's frames in order, as camera k does.
    bodies = [clip[i] for i in range(options.stream_clip_frames) for clip in clips]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
        records, res = _sampled(root_pid, client, _streams_point, server, clips, n, fps, seconds)
        streams = stream_phase(records, seconds, fps, res)
        progress(_phase_line("streams", streams))
        load, res = _sampled(root_pid, client, _image_point, server, bodies, n, seconds, options.stream_warmup)
        image = image_phase(load, res)
        progress(f"  per-image {n} closed-loop clients: {image['frames_per_s']} frames/s, p50 {image['p50_ms']} ms "
                 f"p95 {image['p95_ms']} ms, cpu {image['cpu_cores']} cores, {image['cpu_ms_per_frame']} ms/frame, "
                 f"errors {image['errors']}")
        if options.stream_capacity:
            capacity = {"fps": options.stream_capacity, "from": "--stream-capacity"}
        else:
            pick = max((("streams phase", streams["processed_fps"]), ("per-image closed loop", image["frames_per_s"])),
                       key=lambda kv: kv[1] or 0.0)
            capacity = {"fps": pick[1], "from": f"the larger measured frames/s: the {pick[0]}"}
        overload = None
        if options.stream_overload_seconds > 0 and capacity["fps"]:
            m, m_fps = overload_layout(capacity["fps"], options.stream_overload_multiple, fps, n,
                                       options.stream_overload_max_streams)
            progress(f"  overload: {options.stream_overload_multiple:g}x capacity {capacity['fps']:g} frames/s = "
                     f"{m} streams x {m_fps:g} fps for {options.stream_overload_seconds:g} s")
            records, res = _sampled(root_pid, client, _streams_point, server, clips, m, m_fps,
                                    options.stream_overload_seconds)
            overload = stream_phase(records, options.stream_overload_seconds, m_fps, res)
            overload["multiple"] = options.stream_overload_multiple
            progress(_phase_line("overload", overload))
    return {
        "mode": "streams",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(terse=True)},
        "plan": {"streams": n, "fps": fps, "seconds": seconds, "clips": len(clips),
                 "clip_frames": options.stream_clip_frames, "warmup_s": options.stream_warmup,
                 "overload_seconds": options.stream_overload_seconds,
                 "overload_multiple": options.stream_overload_multiple,
                 "overload_max_streams": options.stream_overload_max_streams},
        "streams": streams, "image": image, "overload": overload,
        "summary": summarize(streams, image, overload, capacity),
    }


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``festival-serve bench``'s arguments: the graph bench's (run.py), and these for ``--streams``."""
    from festival_serve.measure.bench import run as bench_run

    bench_run.add_arguments(parser)
    group = parser.add_argument_group("camera streams (--streams N: WS /v1/streams against the per-image API)")
    group.add_argument("--streams", type=int, metavar="N", help="run the streams bench with N cameras instead")
    group.add_argument("--stream-fps", type=float, default=10.0, help="frames a second each camera sends and asks "
                                                                       "for (default: %(default)s)")
    group.add_argument("--stream-seconds", type=float, default=30.0,
                       help="seconds of the streams phase and of the per-image phase (default: %(default)s)")
    group.add_argument("--stream-overload-seconds", type=float, default=120.0,
                       help="seconds of the overload point, 0 to skip it (default: %(default)s)")
    group.add_argument("--stream-overload-multiple", type=float, default=3.0,
                       help="the overload point offers this multiple of the capacity (default: %(default)s)")
    group.add_argument("--stream-overload-max-streams", type=int, default=32,
                       help="at most this many streams at the overload point; beyond, a higher fps each "
                            "(default: %(default)s, one ingress replica's max_streams)")
    group.add_argument("--stream-capacity", type=float,
                       help="the capacity in frames/s the overload multiplies (default: the larger of the streams "
                            "and per-image phases' frames/s)")
    group.add_argument("--stream-clip-frames", type=int, default=100,
                       help="frames per synthetic clip, looped (default: %(default)s)")
    group.add_argument("--stream-warmup", type=float, default=2.0,
                       help="warm-up seconds of the per-image closed loop (default: %(default)s)")
    group.add_argument("--server", help="a graph already running at this URL (default: start one as the bench does)")
    group.add_argument("--server-pid", type=int, help="the root pid of --server's processes, for the CPU "
                                                       "(default: found from the process listening on its port)")
    return parser


def validate(options: argparse.Namespace) -> None:
    if options.streams < 1:
        raise ValueError("--streams takes at least 1")
    if options.stream_fps <= 0 or options.stream_seconds <= 0 or options.stream_overload_seconds < 0:
        raise ValueError("--stream-fps and --stream-seconds must be positive, --stream-overload-seconds >= 0")
    if options.stream_clip_frames < 1:
        raise ValueError("--stream-clip-frames takes at least 1")


def cmd_bench(options: argparse.Namespace) -> int:
    """``festival-serve bench``: the graph bench (run.py), or with ``--streams N`` the camera-stream bench."""
    if options.streams is None:
        from festival_serve.measure.bench import run as bench_run

        return bench_run.cmd_bench(options)
    return cmd_streams(options)


def cmd_streams(options: argparse.Namespace) -> int:
    from festival_serve.measure.bench.servers import ServerFailed

    try:
        validate(options)
        result = run_streams(options)
    except (ServerFailed, RuntimeError, ValueError) as e:
        print(f"festival-serve bench --streams: {e}", file=sys.stderr)
        return 1
    s = result["summary"]
    print(f"\nbench --streams finished in {result['elapsed_s']:.0f} s; report in {options.out}/streams.md")
    print(f"  frames/s per core: streams {result['streams']['fps_per_core']}, per-image "
          f"{result['image']['fps_per_core']} (ratio {s['per_core_ratio']}); at overload "
          f"{(result.get('overload') or {}).get('fps_per_core')} (ratio {s.get('per_core_ratio_saturated')})")
    for line in target_lines(s):
        print(f"  {line}")
    print(json.dumps({k: v for k, v in s.items() if k != "targets"}
                     | {"targets_met": {k: t["met"] for k, t in s["targets"].items()}}))
    return 0
