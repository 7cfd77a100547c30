"""HTTP load for ``POST /v1/analyze``: closed loop (N clients back to back) and open loop (Poisson
arrivals at a fixed rate, latency counted from the scheduled arrival so a slow server cannot hide
its queue). The same client drives the graph and the baseline."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

import numpy as np

from festival_serve.pipeline.stages import SAFETY_STAGES

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

    def goodput_rps(self) -> float:
        """Answers without a degraded stage, per second of the measured window."""
        return round((len(self.latencies_ms) - self.degraded) / self.duration_s, 3) if self.duration_s > 0 else 0.0

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


async def _post(client: "Client", url: str, body: bytes, describe: bool, result: LoadResult, started: float) -> None:
    try:
        reply = await client.post(url, body, describe)
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
        result.note_error(f"{type(e).__name__}: {e}")
        return
    if reply.status_code != 200:
        result.note_error(f"HTTP {reply.status_code}: {reply.text}")
        return
    result.latencies_ms.append((time.perf_counter() - started) * 1000)
    if reply.json().get("degraded"):
        result.degraded += 1


@dataclass(frozen=True)
class Reply:
    status_code: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDict)
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self):
        return json.loads(self.body)


class Client:
    """POSTs frames over a pool of at most ``limit`` keep-alive connections. aiohttp, not httpx: at the
    overload points (~100 req/s) httpx cost this 2-core machine ~0.7 of a core and fell behind its own
    arrival schedule, so the client's lag showed up as the server's latency; aiohttp costs a fraction."""

    def __init__(self, limit: int, timeout_s: float, multipart: bool = False) -> None:
        self.limit, self.timeout_s, self.multipart = limit, timeout_s, multipart

    async def __aenter__(self) -> "Client":
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.limit),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def post(self, url: str, body: bytes, describe: bool, headers: Mapping[str, str] | None = None) -> Reply:
        flag = "true" if describe else "false"
        content_type = "image/jpeg"
        if self.multipart:
            body, content_type = multipart_body(body, flag)
        async with self.session.post(url, data=body, params={"describe": flag},
                                     headers={"content-type": content_type, **(headers or {})}) as reply:
            return Reply(reply.status, reply.headers, await reply.read())


MULTIPART_BOUNDARY = "festival-serve-load-5f1c"


def multipart_body(image: bytes, describe: str) -> tuple[bytes, str]:
    """``image`` as the file part ``image`` of a multipart form, with ``describe`` as a field too (a server that
    reads only the form, as LitServe's does, gets the flag there); returns (body, content type)."""
    head = (f"--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name=\"describe\"\r\n\r\n{describe}\r\n"
            f"--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"frame.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + image + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode(), \
        f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"


async def closed_loop(url: str, bodies: list[bytes], *, concurrency: int, duration_s: float, describe: bool,
                      warmup_s: float = 0.0, timeout_s: float = 120.0, multipart: bool = False) -> LoadResult:
    """``concurrency`` clients, each sending its next request when the last is answered.

    Warm-up: every client sends at least one request, and keeps going for ``warmup_s``; none of those
    count. The measured window opens when the last client is warm and lasts ``duration_s``; every
    client sends at least one measured request, and the window closes with the last answer."""
    result = LoadResult("closed", concurrency, describe)
    warm = LoadResult("closed", concurrency, describe)
    window: dict[str, float] = {}
    all_warm = asyncio.Event()
    warmed = 0
    async with Client(concurrency, timeout_s, multipart) as client:
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
                    timeout_s: float = 120.0, seed: int = 0, multipart: bool = False) -> LoadResult:
    """Poisson arrivals at ``rate`` per second for ``duration_s``; waits for every request to finish."""
    result = LoadResult("open", rate, describe)
    async with Client(OPEN_LOOP_MAX_IN_FLIGHT, timeout_s, multipart) as client:

        def launch(i: int, scheduled: float, in_flight: int):
            if in_flight >= OPEN_LOOP_MAX_IN_FLIGHT:
                result.note_error(f"overloaded: {OPEN_LOOP_MAX_IN_FLIGHT} requests already in flight")
                return None
            return _post(client, url, bodies[i % len(bodies)], describe, result, scheduled)

        result.duration_s = await _poisson_arrivals(rate, duration_s, seed, launch)
    return result


async def _poisson_arrivals(rate: float | Callable[[float], float], duration_s: float, seed: int, launch) -> float:
    """Call ``launch(i, scheduled_time, in_flight)`` at Poisson arrival times for ``duration_s`` and run each
    coroutine it returns (None: skip that arrival) concurrently; returns the seconds until the last finished.
    ``rate`` is arrivals per second, or a function of the seconds since the start giving the rate then (a
    non-homogeneous process, drawn by thinning: candidates at the peak rate, each kept with rate(t) / peak)."""
    rate_at = rate if callable(rate) else (lambda _t, r=float(rate): r)
    peak = rate if not callable(rate) else max(rate_at(duration_s * k / 1000) for k in range(1001))
    rng = random.Random(seed)
    begin = time.perf_counter()
    pending: set[asyncio.Task] = set()
    scheduled, i = begin, 0
    if peak <= 0:
        await asyncio.sleep(duration_s)
        return time.perf_counter() - begin
    scheduled += rng.expovariate(peak) if callable(rate) else 0.0
    while scheduled < begin + duration_s:
        if callable(rate) and rng.random() * peak > rate_at(scheduled - begin):
            scheduled += rng.expovariate(peak)
            continue
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        request = launch(i, scheduled, len(pending))
        if request is not None:
            task = asyncio.create_task(request)
            pending.add(task)
            task.add_done_callback(pending.discard)
        i += 1
        scheduled += rng.expovariate(peak)
    if pending:
        await asyncio.gather(*pending)
    return time.perf_counter() - begin


# -- overload: open-loop arrivals beyond capacity, each request with a time budget -------------------------

#: An answer "within budget" may arrive this much after the budget (the issue's target: budget + 0.25 s).
BUDGET_SLACK_S = 0.25
#: A refusal counts as fast under this many seconds.
FAST_SHED_S = 0.25
#: Statuses that tell the client to back off (the graph sends Retry-After with them).
SHED_STATUSES = (429, 503)
#: Outcomes of a request that got a 200.
ANSWERED = ("good", "answered_not_good")


@dataclass
class OverloadResult:
    """One open-loop point with a budget per request: what came back, how fast, and whether it was useful."""

    rate: float
    budget_s: float
    describe: bool
    duration_s: float = 0.0
    answered_ms: list[float] = field(default_factory=list)  # 200s
    good: int = 0  # 200s within budget + slack that both safety stages contributed to
    within_budget: int = 0  # responses of any status within budget + slack
    shed_ms: list[float] = field(default_factory=list)  # 429/503
    shed_with_retry_after: int = 0
    shed_fast_with_retry_after: int = 0  # what the target counts: back within FAST_SHED_S *and* saying when to retry
    shed_codes: dict[str, list[int]] = field(default_factory=dict)  # error code → [refusals, of them slow]
    errors: int = 0  # other statuses and transport errors
    hung: int = 0  # nothing back within the client's timeout
    error_examples: list[str] = field(default_factory=list)
    began: float = 0.0  # perf_counter the timeline counts from (the start of the arrivals)
    records: list[tuple[float, str, float, bool]] = field(default_factory=list)  # (sent at s, outcome, s, degraded)

    def note(self, scheduled: float, outcome: str, seconds: float = float("nan"), degraded: bool = False) -> None:
        """One request's fate: sent ``scheduled`` (perf_counter), ``outcome`` (good, answered_not_good, shed_fast,
        shed_slow, error, lost, hung), answered after ``seconds``, with a ``degraded`` list or not."""
        self.records.append((scheduled - self.began, outcome, seconds, degraded))

    def timeline(self) -> list[dict]:
        """Per second of arrivals: how many were sent, what became of them, how many answers were degraded, and
        the latency of the answers (200s) sent in that second."""
        seconds: dict[int, list] = collections.defaultdict(list)
        for record in self.records:
            seconds[int(record[0])].append(record)
        rows = []
        for second, records in sorted(seconds.items()):
            counts = collections.Counter(outcome for _, outcome, _, _ in records)
            answered = [latency for _, outcome, latency, _ in records if outcome in ANSWERED]
            row = {"second": second, "sent": len(records), **dict(sorted(counts.items())),
                   "degraded": sum(1 for *_, degraded in records if degraded)}
            if answered:
                row.update({f"p{q}_ms": round(float(np.percentile(answered, q)) * 1000, 1) for q in (50, 95)})
            rows.append(row)
        return rows

    def summary(self) -> dict:
        responses = len(self.answered_ms) + len(self.shed_ms) + self.errors
        sheds = len(self.shed_ms)
        lat = np.asarray(self.answered_ms) if self.answered_ms else np.asarray([np.nan])
        return {
            "rate": self.rate, "budget_s": self.budget_s, "describe": self.describe,
            "duration_s": round(self.duration_s, 2), "sent": responses + self.hung,
            "answered": len(self.answered_ms), "shed": sheds, "errors": self.errors, "hung": self.hung,
            "goodput_rps": round(self.good / self.duration_s, 3) if self.duration_s > 0 else 0.0,
            "within_budget": round(self.within_budget / responses, 4) if responses else None,
            "shed_with_retry_after": round(self.shed_with_retry_after / sheds, 4) if sheds else None,
            "shed_fast": round(self.shed_fast_with_retry_after / sheds, 4) if sheds else None,
            "shed_p50_ms": _round(np.percentile(self.shed_ms, 50)) if sheds else None,
            "shed_codes": {code: {"count": n, "slow": slow} for code, (n, slow) in sorted(self.shed_codes.items())},
            **{f"p{q}_ms": _round(np.percentile(lat, q)) for q in (50, 99)},
            "error_examples": self.error_examples,
            "timeline": self.timeline(),
        }


def useful(body: dict) -> bool:
    """An answer both safety stages contributed to (a degraded reader or describer still counts)."""
    return not any(isinstance(d, dict) and d.get("stage") in SAFETY_STAGES for d in body.get("degraded", []))


async def _post_with_budget(client: Client, url: str, body: bytes, result: OverloadResult, started: float) -> None:
    try:
        reply = await client.post(url, body, result.describe, {"x-request-timeout-seconds": f"{result.budget_s:g}"})
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
        if isinstance(e, asyncio.TimeoutError):
            result.hung += 1
            result.note(started, "hung")
        else:  # no HTTP answer at all (refused or reset connection): the request is lost
            result.errors += 1
            result.note(started, "lost")
            if len(result.error_examples) < 3:
                result.error_examples.append(f"{type(e).__name__}: {e}"[:200])
        return
    seconds = time.perf_counter() - started
    in_time = seconds <= result.budget_s + BUDGET_SLACK_S
    result.within_budget += in_time
    if reply.status_code == 200:
        result.answered_ms.append(seconds * 1000)
        answer = reply.json()
        good = in_time and useful(answer)
        result.good += good
        result.note(started, "good" if good else "answered_not_good", seconds, bool(answer.get("degraded")))
    elif reply.status_code in SHED_STATUSES:
        result.shed_ms.append(seconds * 1000)
        retry_after = "retry-after" in reply.headers
        result.shed_with_retry_after += retry_after
        result.shed_fast_with_retry_after += retry_after and seconds < FAST_SHED_S
        counts = result.shed_codes.setdefault(_error_code(reply), [0, 0])
        counts[0] += 1
        counts[1] += seconds >= FAST_SHED_S
        result.note(started, "shed_slow" if seconds >= FAST_SHED_S else "shed_fast", seconds)
    else:
        result.errors += 1
        result.note(started, "error", seconds)
        if len(result.error_examples) < 3:
            result.error_examples.append(f"HTTP {reply.status_code}: {reply.text}"[:200])


def _error_code(reply: Reply) -> str:
    """The ``error.code`` of a refusal's JSON body; ``proxy`` for one without (Ray's proxy answers in text)."""
    try:
        return str(reply.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "proxy"


async def overload(url: str, bodies: list[bytes], *, rate: float | Callable[[float], float], duration_s: float,
                   budget_s: float, describe: bool = False, hang_after_s: float = 30.0, seed: int = 0,
                   progress: Callable[[OverloadResult], Awaitable[None]] | None = None,
                   multipart: bool = False) -> OverloadResult:
    """Poisson arrivals at ``rate`` per second (or ``rate(seconds since the start)``) for ``duration_s``, each
    request carrying ``budget_s`` in Ray Serve's ``x-request-timeout-seconds``; latency counts from the scheduled
    arrival. A request with no reply ``hang_after_s`` past its budget counts as hung. ``progress``, if given,
    runs beside the arrivals (e.g. printing what has come back) and is cancelled when they end."""
    result = OverloadResult(rate if not callable(rate) else 0.0, budget_s, describe)
    async with Client(OPEN_LOOP_MAX_IN_FLIGHT, budget_s + hang_after_s, multipart) as client:

        def launch(i: int, scheduled: float, in_flight: int):
            return _post_with_budget(client, url, bodies[i % len(bodies)], result, scheduled)

        result.began = time.perf_counter()
        reporter = asyncio.create_task(progress(result)) if progress else None
        try:
            result.duration_s = await _poisson_arrivals(rate, duration_s, seed, launch)
        finally:
            if reporter:
                reporter.cancel()
    return result
