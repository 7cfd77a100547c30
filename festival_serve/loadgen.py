"""HTTP load for ``POST /v1/analyze``: closed loop (N clients back to back) and open loop (Poisson
arrivals at a fixed rate, latency counted from the scheduled arrival so a slow server cannot hide
its queue). The same client drives the graph and the baseline."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import numpy as np

#: Requests in flight at once in open loop, at most; arrivals beyond it count as errors ("overloaded").
OPEN_LOOP_MAX_IN_FLIGHT = 512


@dataclass
class LoadResult:
    mode: str  # "closed" or "open"
    level: float  # concurrency (closed) or arrivals per second (open)
    describe: bool
    duration_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    degraded: int = 0
    error_examples: list[str] = field(default_factory=list)

    def note_error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 3:
            self.error_examples.append(what[:200])

    def summary(self) -> dict:
        ok = len(self.latencies_ms)
        lat = np.asarray(self.latencies_ms) if ok else np.asarray([np.nan])
        return {
            "mode": self.mode,
            "level": self.level,
            "describe": self.describe,
            "requests": ok + self.errors,
            "ok": ok,
            "errors": self.errors,
            "degraded": self.degraded,
            "duration_s": round(self.duration_s, 2),
            "throughput_rps": round(ok / self.duration_s, 3) if self.duration_s > 0 else 0.0,
            **{f"p{q}_ms": _round(np.percentile(lat, q)) for q in (50, 95, 99)},
            "error_examples": self.error_examples,
        }


def _round(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 2)


async def _post(client, url: str, body: bytes, describe: bool, result: LoadResult, started: float) -> None:
    try:
        reply = await client.post(url, content=body, params={"describe": "true" if describe else "false"},
                                  headers={"content-type": "image/jpeg"})
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
        result.note_error(f"{type(e).__name__}: {e}")
        return
    if reply.status_code != 200:
        result.note_error(f"HTTP {reply.status_code}: {reply.text}")
        return
    result.latencies_ms.append((time.perf_counter() - started) * 1000)
    if reply.json().get("degraded"):
        result.degraded += 1


def _client(limit: int, timeout_s: float):
    import httpx

    return httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))


async def closed_loop(url: str, bodies: list[bytes], *, concurrency: int, duration_s: float, describe: bool,
                      warmup_s: float = 0.0, timeout_s: float = 120.0) -> LoadResult:
    """``concurrency`` clients, each sending its next request when the last is answered.

    Warm-up: every client sends at least one request, and keeps going for ``warmup_s``; none of those
    count. The measured window opens when the last client is warm and lasts ``duration_s``; every
    client sends at least one measured request, and the window closes with the last answer."""
    result = LoadResult("closed", concurrency, describe)
    warm = LoadResult("closed", concurrency, describe)
    window: dict[str, float] = {}
    all_warm = asyncio.Event()
    warmed = 0
    async with _client(concurrency, timeout_s) as client:
        warm_until = time.perf_counter() + warmup_s

        async def worker(index: int) -> None:
            nonlocal warmed
            i = index
            while True:
                await _post(client, url, bodies[i % len(bodies)], describe, warm, time.perf_counter())
                i += concurrency
                if time.perf_counter() >= warm_until:
                    break
            warmed += 1
            if warmed == concurrency:
                window["start"] = time.perf_counter()
                window["stop"] = window["start"] + duration_s
                all_warm.set()
            await all_warm.wait()
            while True:
                await _post(client, url, bodies[i % len(bodies)], describe, result, time.perf_counter())
                i += concurrency
                if time.perf_counter() >= window["stop"]:
                    break

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        result.duration_s = time.perf_counter() - window["start"]
    return result


async def open_loop(url: str, bodies: list[bytes], *, rate: float, duration_s: float, describe: bool,
                    timeout_s: float = 120.0, seed: int = 0) -> LoadResult:
    """Poisson arrivals at ``rate`` per second for ``duration_s``; waits for every request to finish."""
    result = LoadResult("open", rate, describe)
    rng = random.Random(seed)
    async with _client(OPEN_LOOP_MAX_IN_FLIGHT, timeout_s) as client:
        begin = time.perf_counter()
        pending: set[asyncio.Task] = set()
        scheduled, i = begin, 0
        while scheduled < begin + duration_s:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= OPEN_LOOP_MAX_IN_FLIGHT:
                result.note_error(f"overloaded: {OPEN_LOOP_MAX_IN_FLIGHT} requests already in flight")
            else:
                task = asyncio.create_task(_post(client, url, bodies[i % len(bodies)], describe, result, scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
            i += 1
            scheduled += rng.expovariate(rate)
        if pending:
            await asyncio.gather(*pending)
        result.duration_s = time.perf_counter() - begin
    return result
