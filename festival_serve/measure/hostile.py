"""``festival-serve load --hostile``: what hostile clients do to a normal one.

    festival-serve load --hostile --url http://127.0.0.1:8000                 # ~3 min, writes docs/load/hostile.json
    festival-serve load --hostile --hostile-seconds 10 --attacks scan_bombs,big_png

A normal client (``--clients`` closed-loop workers posting held-out scenes with ``x-request-timeout-seconds:
--budget`` and ``describe=false``) runs the whole time, in a process of its own so that the attackers' event loop
never delays its clock. Phases follow one another against the running server: quiet (the baseline), then each
attack of ``ATTACKS`` (``--hostile-warmup`` seconds of the attack first, then ``--hostile-seconds`` measured,
then its attackers closed), then quiet again, measured from the moment the last attackers left. Per phase: the
normal client's goodput (200s within the budget that both safety stages contributed to, per second), its ratio
to the quiet goodput, its p95 and statuses, and how the attackers were answered. Recovery: seconds from the last
attack's end until the normal client's goodput over a sliding ``RECOVERY_WINDOW_S`` window is back to
``GOODPUT_RATIO_TARGET`` of quiet (looked for up to ``RECOVERY_CAP_S``).

Slow, header-trickling and idle connections are raw sockets (``asyncio.open_connection``), each on its own TCP
connection; scan bombs and 40 MP PNGs go through an ``httpx.AsyncClient`` per attack, never the normal client's
pool. Each attacker the server ends reconnects, so the pressure holds for the whole phase.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import io
import json
import logging
import multiprocessing
import os
import queue
import resource
import struct
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple
from urllib.parse import urlsplit

import numpy as np

from festival_serve.measure import loadgen

#: Every attack phase keeps the normal client's goodput at this fraction of quiet, at least.
GOODPUT_RATIO_TARGET = 0.8
#: Seconds after the last attack within which the normal client's goodput is back (to the fraction above).
RECOVERY_TARGET_S = 6.0
#: Seconds after the last attack the recovery is looked for, at most.
RECOVERY_CAP_S = 30.0
#: Width and step of the sliding window the recovery is judged on, seconds.
RECOVERY_WINDOW_S, RECOVERY_STEP_S = 1.0, 0.1
#: Seconds between progress lines on stderr.
PROGRESS_EVERY_S = 5.0
#: Seconds a raw attacker waits before reconnecting after the server ended it (no hot loop on a refusing port).
RECONNECT_PAUSE_S = 0.1
#: Seconds a TCP connect may take before it counts as failed.
CONNECT_TIMEOUT_S = 10.0
#: Seconds the normal client waits for an answer past its budget before it counts the request as a timeout.
NORMAL_CLIENT_GRACE_S = 5.0
#: Seconds the normal client's process may take to start and get its first answer.
NORMAL_CLIENT_START_S = 60.0
#: Seconds to wait for the server's /readyz to say 200 before measuring anyway.
READY_WAIT_S = 120.0
#: Seconds a scan-bomb or PNG sender waits for an answer.
SENDER_TIMEOUT_S = 60.0
#: How a raw connection ended that was still open when its phase ended.
OPEN_AT_END = "open_at_end"

#: The attack phases, in the order they run (``--attacks`` picks some, in this order).
ATTACKS = ("slow_body", "slow_headers", "idle", "scan_bombs", "big_png")
#: ``--distinct-hosts``' addresses: all of 127.0.0.0/8 is this machine's loopback, so a client can bind any of
#: them and a server (or HAProxy's per-address limits) sees distinct hosts.
NORMAL_SOURCE_PREFIX, ATTACKER_SOURCE = "127.0.1.", "127.0.2.1"


@dataclass
class HostileOptions:
    """What ``--hostile`` runs; the defaults make the whole run ~3 minutes."""

    clients: int = 4  # normal closed-loop clients
    budget_s: float = 2.0  # their x-request-timeout-seconds
    warmup_s: float = 5.0  # of each phase, not measured
    phase_s: float = 20.0  # measured, per phase
    slow_bodies: int = 64  # each declares a real frame's Content-Length, then sends 1 byte/s of it
    slow_headers: int = 200  # each sends a request line, then one header byte a second, never ending the headers
    idle: int = 500  # each connects and sends nothing
    bomb_clients: int = 2  # each posts a scan bomb, again and again
    png_senders: int = 8  # each posts a 40 MP PNG of zeros, again and again
    bomb_bytes: int = 140_000  # size of each scan bomb
    png_size: tuple[int, int] = (7800, 5100)  # width, height of the PNG (39.8 MP: under a 40 MP pixel cap)
    attacks: tuple[str, ...] = ATTACKS
    distinct_hosts: bool = False  # normal clients and attackers from their own loopback addresses (below)
    attackers_nice: int = 19  # this process's niceness once the normal client is started (below)

    def normal_source(self, index: int) -> str | None:
        """Normal client ``index``'s source address: with ``distinct_hosts`` each is a host of its own, as cameras
        are, under a front proxy's per-address limits."""
        return f"{NORMAL_SOURCE_PREFIX}{index + 1}" if self.distinct_hosts else None

    @property
    def attacker_source(self) -> str | None:
        """Every attacker's source address: one hostile host (with ``distinct_hosts``)."""
        return ATTACKER_SOURCE if self.distinct_hosts else None


# -- payloads -------------------------------------------------------------------------------------------


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a JPEG after SOI, EOI the last; an SOS segment's end takes
    in its entropy-coded data (up to the next marker that is neither a stuffed 0xFF00 nor a restart)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG: no SOI")
    segments, i = [], 2
    while i + 1 < len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xD9:
            segments.append((marker, i, i + 2))
            break
        end = i + 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        segments.append((marker, i, end))
        i = end
    return segments


def count_scans(data: bytes) -> int:
    """SOS markers of a JPEG: 1 for a baseline one, ~10 for a progressive one from libjpeg."""
    return sum(1 for marker, _, _ in jpeg_segments(data) if marker == 0xDA)


def scan_bomb(target_bytes: int = 140_000, *, size: tuple[int, int] = (848, 480), variant: int = 0) -> bytes:
    """A progressive JPEG of a grey ``size`` frame whose luma AC refinement scan (``variant`` picks which of the
    two libjpeg writes) is repeated before EOI until the file is ~``target_bytes``. That scan is a dozen bytes
    that refine nothing, yet a decoder walks every coefficient of every block of the frame for each copy: at
    140 KB (~11,000 scans, 848x480) Pillow takes seconds of CPU for a file a camera frame's size."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    segments = jpeg_segments(data)
    refinements = [(start, end) for marker, start, end in segments if marker == 0xDA and _luma_ac_refinement(data, start)]
    if not refinements:
        raise ValueError("the encoder wrote no luma AC refinement scan")
    start, end = refinements[variant % len(refinements)]
    copies = max(1, (target_bytes - len(data)) // (end - start))
    eoi = segments[-1][1]
    return data[:eoi] + data[start:end] * copies + data[eoi:]


def _luma_ac_refinement(data: bytes, sos: int) -> bool:
    """Whether the SOS segment at ``sos`` scans the first component alone, AC coefficients, as a refinement
    (successive approximation high bit Ah > 0)."""
    components = data[sos + 4]
    spectral_start = data[sos + 5 + 2 * components]
    approximation_high = data[sos + 7 + 2 * components] >> 4
    return components == 1 and data[sos + 5] == 1 and spectral_start > 0 and approximation_high > 0


def zeros_png(width: int, height: int) -> bytes:
    """A grey PNG of zeros: ``width`` x ``height`` pixels (40 MP: ~39 KB on the wire, 40 MB decoded)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def decode_seconds(data: bytes) -> float:
    """Seconds Pillow takes to decode ``data`` here."""
    from PIL import Image

    began = time.perf_counter()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return time.perf_counter() - began


# -- the normal client (a process of its own) ----------------------------------------------------------


class Sample(NamedTuple):
    """One request of the normal client: when it left and came back (``time.monotonic``, one clock for every
    process of a Linux machine), its status ("200", "503", "timeout", "error:ConnectError") and whether it was
    good (a 200 within the budget that both safety stages contributed to)."""

    began: float
    ended: float
    status: str
    good: bool


def _normal_client_process(url: str, bodies: list[bytes], sources: list[str | None], budget_s: float, stop,
                           out) -> None:
    parent = os.getppid()

    async def orphaned() -> None:  # a killed command leaves no client posting on its own
        while os.getppid() == parent and not stop.is_set():
            await asyncio.sleep(0.5)
        stop.set()

    async def main() -> None:
        await asyncio.gather(orphaned(), _normal_client(url, bodies, sources, budget_s, stop, out))

    asyncio.run(main())


async def _normal_client(url: str, bodies: list[bytes], sources: list[str | None], budget_s: float, stop,
                         out) -> None:
    """One closed-loop client per entry of ``sources``, each over its own connection from that source address
    (None: the system's choice)."""
    import httpx

    from festival_serve.serving.http import BUDGET_HEADER

    headers = {"content-type": "image/jpeg", BUDGET_HEADER: f"{budget_s:g}"}
    clients = len(sources)

    async def worker(index: int, source: str | None) -> None:
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=source),
                                     timeout=budget_s + NORMAL_CLIENT_GRACE_S) as client:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    reply = await client.post(url, content=bodies[index % len(bodies)], params={"describe": "false"},
                                              headers=headers)
                    status, good = str(reply.status_code), reply.status_code == 200 and _useful_json(reply.content)
                except httpx.TimeoutException:
                    status, good = "timeout", False
                except httpx.HTTPError as e:
                    status, good = f"error:{type(e).__name__}", False
                ended = time.monotonic()
                out.put(Sample(began, ended, status, good and ended - began <= budget_s + loadgen.BUDGET_SLACK_S))
                if status.startswith("error:"):
                    await asyncio.sleep(RECONNECT_PAUSE_S)  # a refused connection answers at once: no hot loop
                index += clients

    await asyncio.gather(*(worker(k, source) for k, source in enumerate(sources)))


def _useful_json(body: bytes) -> bool:
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and loadgen.useful(answer)


class NormalClient:
    """The normal clients in a spawned process; their samples come back through a queue, drained here."""

    def __init__(self, url: str, bodies: list[bytes], sources: list[str | None], budget_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop, self._queue = context.Event(), context.Queue()
        self._process = context.Process(target=_normal_client_process, daemon=True, name="normal-client",
                                        args=(url, bodies, sources, budget_s, self._stop, self._queue))
        self.samples: list[Sample] = []
        self.wait_s = budget_s + NORMAL_CLIENT_GRACE_S + 5

    def start(self) -> "NormalClient":
        self._process.start()
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the first answer (of any status) came back within ``timeout_s``: the process is up and posting."""
        deadline = time.monotonic() + timeout_s
        while not self.drain() and time.monotonic() < deadline and self._process.is_alive():
            time.sleep(0.1)
        return bool(self.samples)

    def drain(self) -> list[Sample]:
        while True:
            try:
                self.samples.append(Sample(*self._queue.get_nowait()))
            except queue.Empty:
                return self.samples

    def stop(self) -> list[Sample]:
        self._stop.set()
        deadline = time.monotonic() + self.wait_s
        while self._process.is_alive() and time.monotonic() < deadline:
            self.drain()  # a child with samples in its queue's pipe exits only once they are read
            self._process.join(0.2)
        if self._process.is_alive():
            self._process.terminate()
        time.sleep(0.1)
        return self.drain()


# -- the attacks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str  # of /v1/analyze
    tls: bool

    @classmethod
    def of(cls, url: str) -> "Target":
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        return cls(parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80),
                   parts.path.rstrip("/") + "/v1/analyze", tls)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{self.path}"


class Connection(NamedTuple):
    """One raw attacker connection: opened and ended (monotonic s) and how it ended: the status the server answered
    with ("408"), "closed" or "reset" by the server, ``OPEN_AT_END``, or "connect_failed:<error>"."""

    opened: float
    ended: float
    how: str


class RawAttack:
    """``count`` raw TCP connections, each sending ``first`` and then ``trickle(i)`` once a second (or nothing),
    until the server answers or closes it (then it reconnects) or the phase ends."""

    def __init__(self, label: str, count: int, target: Target, first: bytes,
                 trickle: Callable[[int], bytes] | None, source: str | None = None) -> None:
        self.label, self.count, self.target, self.first, self.trickle = label, count, target, first, trickle
        self.source = source  # the attackers' address (None: the system's choice)
        self.connections: list[Connection] = []
        self.open = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> "RawAttack":
        self._tasks = [asyncio.create_task(self._attacker()) for _ in range(self.count)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        if not self._tasks:
            return
        _, stuck = await asyncio.wait(self._tasks, timeout=2.0)  # those still connecting, or pausing after a failure
        for task in stuck:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _attacker(self) -> None:
        while not self._stop.is_set():
            await self._connection()
            if not self._stop.is_set():
                await asyncio.sleep(RECONNECT_PAUSE_S)

    async def _connection(self) -> None:
        began = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.target.host, self.target.port, ssl=self.target.tls or None,
                                        local_addr=(self.source, 0) if self.source else None),
                CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as e:
            self.connections.append(Connection(began, time.monotonic(), f"connect_failed:{type(e).__name__}"))
            await asyncio.sleep(1.0)
            return
        opened, how, step = time.monotonic(), None, 0
        self.open += 1
        answer = asyncio.create_task(_server_end(reader))
        stopping = asyncio.create_task(self._stop.wait())
        try:
            if self.first:
                writer.write(self.first)
            while how is None:
                done, _ = await asyncio.wait({answer, stopping}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if answer in done:
                    how = answer.result()
                elif stopping in done:
                    how = OPEN_AT_END
                elif self.trickle is not None:
                    writer.write(self.trickle(step))  # a byte a second never fills a buffer: no drain
                    step += 1
        except (ConnectionError, OSError):
            how = "reset"
        finally:
            answer.cancel()
            stopping.cancel()
            writer.close()
            self.open -= 1
        self.connections.append(Connection(opened, time.monotonic(), how))

    def summary(self) -> dict:
        failed = collections.Counter(c.how.split(":", 1)[1] for c in self.connections if c.how.startswith("connect_"))
        made = [c for c in self.connections if not c.how.startswith("connect_")]
        ended: dict[str, list[float]] = collections.defaultdict(list)
        for c in made:
            if c.how != OPEN_AT_END:
                ended[c.how].append(c.ended - c.opened)
        held = [c.ended - c.opened for c in made if c.how == OPEN_AT_END]
        return {"attack": self.label, "attackers": self.count, "connections": len(made),
                "connect_failed": dict(failed), "open_at_end": len(held),
                "open_at_end_held_s_median": _round(float(np.median(held))) if held else None,
                "ended_by_server": {how: {"count": len(after), "after_s_median": _round(float(np.median(after))),
                                          "after_s_max": _round(max(after))}
                                    for how, after in sorted(ended.items())}}

    def progress(self) -> str:
        ended = sum(1 for c in self.connections if c.how not in (OPEN_AT_END,) and not c.how.startswith("connect_"))
        return f"attackers open {self.open}/{self.count}, ended by the server {ended}"


async def _server_end(reader: asyncio.StreamReader) -> str:
    """How the server ended a connection that never finished its request: the status it answered, or closed/reset."""
    try:
        data = await reader.read(65536)
    except (ConnectionError, OSError):
        return "reset"
    if not data:
        return "closed"
    parts = data.split(b" ", 2)
    return parts[1].decode() if data.startswith(b"HTTP/") and len(parts) > 1 and parts[1].isdigit() else "answered"


class HttpAttack:
    """``count`` senders posting ``bodies[i % len]`` back to back over an ``httpx.AsyncClient`` of their own."""

    def __init__(self, label: str, count: int, target: Target, bodies: list[bytes], content_type: str,
                 source: str | None = None) -> None:
        self.label, self.count, self.target, self.bodies, self.content_type = label, count, target, bodies, content_type
        self.source = source
        self.answers: list[tuple[float, float, str]] = []  # (sent, answered, "400 too_many_scans" | "timeout" | …)
        self.in_flight = 0
        self.in_flight_at_end = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> "HttpAttack":
        import httpx

        limits = httpx.Limits(max_connections=self.count, max_keepalive_connections=self.count)
        self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(limits=limits, verify=False,
                                                                            local_address=self.source),
                                         timeout=SENDER_TIMEOUT_S)
        self._tasks = [asyncio.create_task(self._sender(k)) for k in range(self.count)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        self.in_flight_at_end = self.in_flight
        for task in self._tasks:
            task.cancel()  # a request in flight is abandoned: its connection closes, as a leaving client's would
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def _sender(self, index: int) -> None:
        import httpx

        body = self.bodies[index % len(self.bodies)]
        while not self._stop.is_set():
            began = time.monotonic()
            self.in_flight += 1
            try:
                reply = await self._client.post(self.target.url, content=body, params={"describe": "false"},
                                                headers={"content-type": self.content_type})
                outcome = f"{reply.status_code} {_error_code(reply.content)}".rstrip()
            except httpx.TimeoutException:
                outcome = "timeout"
            except httpx.HTTPError as e:
                outcome = f"error:{type(e).__name__}"
            finally:
                self.in_flight -= 1
            self.answers.append((began, time.monotonic(), outcome))
            if outcome.startswith("error:"):
                await asyncio.sleep(RECONNECT_PAUSE_S)

    def summary(self) -> dict:
        latency = [ended - began for began, ended, _ in self.answers]
        return {"attack": self.label, "senders": self.count, "requests": len(self.answers),
                "statuses": dict(collections.Counter(outcome for *_, outcome in self.answers).most_common()),
                "latency_s": {"p50": _percentile(latency, 50), "p95": _percentile(latency, 95),
                              "max": _round(max(latency)) if latency else None},
                "in_flight_at_end": self.in_flight_at_end}

    def progress(self) -> str:
        statuses = collections.Counter(outcome for *_, outcome in self.answers)
        return f"attackers answered {dict(statuses.most_common(3))}, in flight {self.in_flight}"


def _error_code(body: bytes) -> str:
    """The ``error.code`` of an answer's JSON, or "" (a 200, or a proxy's plain-text refusal)."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


@dataclass
class Payloads:
    frame: bytes  # a real frame: its Content-Length is what the slow bodies declare
    bombs: list[bytes]
    png: bytes
    png_size: tuple[int, int]
    bomb_decode_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {"frame_bytes": len(self.frame),
                "scan_bombs": [{"bytes": len(bomb), "scans": count_scans(bomb), "pillow_decode_s_here": _round(s)}
                               for bomb, s in zip(self.bombs, self.bomb_decode_s)],
                "png": {"bytes": len(self.png), "width": self.png_size[0], "height": self.png_size[1]}}


def make_attack(name: str, options: HostileOptions, target: Target, payloads: Payloads) -> RawAttack | HttpAttack:
    """The attackers of phase ``name`` (one of ``ATTACKS``), not yet started."""
    host, source = f"Host: {target.host}:{target.port}\r\n", options.attacker_source
    if name == "slow_body":
        head = (f"POST {target.path}?describe=false HTTP/1.1\r\n{host}Content-Type: image/jpeg\r\n"
                f"Content-Length: {len(payloads.frame)}\r\n\r\n").encode()
        frame = payloads.frame
        return RawAttack(f"{options.slow_bodies} slow bodies (1 B/s)", options.slow_bodies, target, head,
                         lambda i: frame[i % len(frame):i % len(frame) + 1], source)
    if name == "slow_headers":
        headers = f"{host}x-slow: ".encode()
        return RawAttack(f"{options.slow_headers} slow headers (1 B/s)", options.slow_headers, target,
                         f"POST {target.path} HTTP/1.1\r\n".encode(),
                         lambda i: headers[i:i + 1] if i < len(headers) else b"a", source)
    if name == "idle":
        return RawAttack(f"{options.idle} idle connections", options.idle, target, b"", None, source)
    if name == "scan_bombs":
        return HttpAttack(f"{options.bomb_clients} scan-bomb senders", options.bomb_clients, target, payloads.bombs,
                          "image/jpeg", source)
    if name == "big_png":
        width, height = payloads.png_size
        return HttpAttack(f"{options.png_senders} senders of {width * height / 1e6:.1f} MP PNGs", options.png_senders,
                          target, [payloads.png], "image/png", source)
    raise ValueError(f"unknown attack {name!r}; the attacks are: {', '.join(ATTACKS)}")


# -- the arithmetic of a phase --------------------------------------------------------------------------


def phase_stats(samples: list[Sample], start: float, end: float) -> dict:
    """The normal client's requests that came back within [start, end): goodput, p95 (of every request, whatever
    its status, and of the 200s) and statuses."""
    inside = [s for s in samples if start <= s.ended < end]
    good = sum(s.good for s in inside)
    seconds = end - start
    return {"window_s": _round(seconds), "requests": len(inside), "good": good,
            "goodput_rps": _round(good / seconds) if seconds > 0 else 0.0,
            "p95_ms": _ms(_percentile([s.ended - s.began for s in inside], 95)),
            "p95_ok_ms": _ms(_percentile([s.ended - s.began for s in inside if s.status == "200"], 95)),
            "statuses": dict(collections.Counter(s.status for s in inside).most_common())}


def recovery_seconds(samples: list[Sample], since: float, quiet_rps: float, *, until: float,
                     settle: float = GOODPUT_RATIO_TARGET, window_s: float = RECOVERY_WINDOW_S,
                     step_s: float = RECOVERY_STEP_S) -> float | None:
    """Seconds from ``since`` to the start of the first ``window_s`` window (slid by ``step_s``, ending by
    ``until``) holding at least ``settle`` x ``quiet_rps`` x ``window_s`` good answers of the normal client (by
    when they came back); None if no window did."""
    good = sorted(s.ended for s in samples if s.good and s.ended >= since)
    need = max(settle * quiet_rps * window_s, 1e-9)
    for k in range(int((until - since - window_s) / step_s + 1e-9) + 1):
        start = since + k * step_s
        if bisect.bisect_left(good, start + window_s) - bisect.bisect_left(good, start) >= need:
            return round(k * step_s, 2)
    return None


def judge(phases: list[dict], recovery_s: float | None) -> dict:
    """Ratios to quiet and the targets, met or missed, written into each phase; the run's verdict returned."""
    quiet = phases[0]["normal"]["goodput_rps"]
    for phase in phases[1:]:
        ratio = phase["normal"]["goodput_rps"] / quiet if quiet else None
        phase["normal"]["ratio_to_quiet"] = None if ratio is None else round(ratio, 3)
        if phase["name"] == "recovery":
            phase["target"] = f"recovery <= {RECOVERY_TARGET_S:g} s"
            phase["met"] = recovery_s is not None and recovery_s <= RECOVERY_TARGET_S
        else:
            phase["target"] = f">= {GOODPUT_RATIO_TARGET:g} x quiet"
            phase["met"] = ratio is not None and ratio >= GOODPUT_RATIO_TARGET
    phases[0]["normal"]["ratio_to_quiet"] = 1.0
    return {"goodput_ratio_target": GOODPUT_RATIO_TARGET, "recovery_target_s": RECOVERY_TARGET_S,
            "recovery_s": recovery_s, "met": all(phase["met"] for phase in phases[1:]),
            "missed": [phase["name"] for phase in phases[1:] if not phase["met"]]}


# -- the run --------------------------------------------------------------------------------------------


class LoopLag:
    """How late this event loop wakes (the attackers' loop): a run whose attackers could not keep their pace says so."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (monotonic s, lag s)

    async def watch(self) -> None:
        while True:
            planned = time.monotonic() + 0.05
            await asyncio.sleep(0.05)
            now = time.monotonic()
            self.samples.append((now, now - planned))

    def max_ms(self, start: float, end: float) -> float | None:
        lags = [lag for t, lag in self.samples if start <= t < end]
        return _ms(max(lags)) if lags else None


async def run(target: Target, bodies: list[bytes], payloads: Payloads, options: HostileOptions,
              log: Callable[[str], None]) -> dict:
    """Every phase against ``target``; the report (without the targets' verdict)."""
    sources = [options.normal_source(k) for k in range(options.clients)]
    normal = NormalClient(target.url, bodies, sources, options.budget_s).start()
    # The attackers run in this process. At a festival they are other machines, with CPUs of their own; here they
    # share the server's cores, and a flood's own client work (~1 ms of Python per request) would be counted as
    # harm done by the server. At niceness 19 they take only what the server and the normal client leave.
    # Each phase reports the CPU they used.
    os.nice(max(0, options.attackers_nice - os.nice(0)))
    lag = LoopLag()
    watcher = asyncio.create_task(lag.watch())
    windows: list[dict] = []
    try:
        # A spawned interpreter takes seconds to import its way to the first request: the quiet phase waits for it.
        if not await asyncio.to_thread(normal.wait_ready, NORMAL_CLIENT_START_S):
            log(f"the normal client got no answer within {NORMAL_CLIENT_START_S:g} s of starting; stopping")
            return {"phases": [], "recovery_s": None, "complete": False}
        for name in ("quiet", *options.attacks):
            attack = make_attack(name, options, target, payloads).start() if name != "quiet" else None
            label = attack.label if attack else "none"
            log(f"{name}: {label}; {options.warmup_s:g} s warm-up, {options.phase_s:g} s measured")
            progress = Progress(name, normal, attack, log)
            await progress.wait(options.warmup_s)
            start, cpu_start = time.monotonic(), time.process_time()
            await progress.wait(options.phase_s)
            end, attackers_cpu_s = time.monotonic(), time.process_time() - cpu_start
            if attack:
                await attack.stop()
            windows.append({"name": name, "attack": label, "warmup_from": progress.began, "start": start, "end": end,
                            "attackers": attack.summary() if attack else None,
                            "attackers_cpu_per_s": round(attackers_cpu_s / (end - start), 3)})
            if name == "quiet" and not phase_stats(normal.drain(), start, end)["good"]:
                log("the normal client got no good answer in the quiet phase: no baseline; stopping")
                break
        else:
            since = time.monotonic()  # the last attackers have left
            log(f"recovery: quiet again; {options.phase_s:g} s measured, up to {RECOVERY_CAP_S:g} s for the recovery")
            quiet_rps = phase_stats(normal.drain(), windows[0]["start"], windows[0]["end"])["goodput_rps"]
            progress = Progress("recovery", normal, None, log)
            while True:
                await progress.wait(RECOVERY_STEP_S * 5)
                now = time.monotonic()
                # Answers still in flight come back within the budget; a window ending in the last half second
                # may not have all of its own yet.
                recovered = recovery_seconds(normal.drain(), since, quiet_rps, until=now - 0.5)
                if now - since >= options.phase_s and (recovered is not None or now - since >= RECOVERY_CAP_S):
                    break
            windows.append({"name": "recovery", "attack": "none", "warmup_from": since, "start": since,
                            "end": since + options.phase_s, "looked_until": now, "attackers": None})
    finally:
        watcher.cancel()
        samples = await asyncio.to_thread(normal.stop)
    phases = [{"name": w["name"], "attack": w["attack"], "normal": phase_stats(samples, w["start"], w["end"]),
               "attackers": w["attackers"], "attack_loop_lag_max_ms": lag.max_ms(w["warmup_from"], w["end"]),
               "attackers_cpu_per_s": w.get("attackers_cpu_per_s")}
              for w in windows]
    complete = bool(windows) and windows[-1]["name"] == "recovery"
    recovery = None
    if complete:
        w = windows[-1]
        recovery = recovery_seconds(samples, w["start"], phases[0]["normal"]["goodput_rps"], until=w["looked_until"])
    return {"phases": phases, "recovery_s": recovery, "complete": complete}


class Progress:
    """A line on stderr every ``PROGRESS_EVERY_S`` of a phase: the normal client's last seconds and the attackers."""

    def __init__(self, name: str, normal: NormalClient, attack: RawAttack | HttpAttack | None,
                 log: Callable[[str], None]) -> None:
        self.name, self.normal, self.attack, self.log = name, normal, attack, log
        self.began = self.last = time.monotonic()

    async def wait(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.5))
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY_S:
                recent = phase_stats(self.normal.drain(), self.last, now)
                self.last = now
                self.log(f"  {self.name:12s} t={now - self.began:4.0f} s  normal good {recent['goodput_rps']:5.1f}/s  "
                         f"p95 {_fmt(recent['p95_ms'])} ms  {recent['statuses']}"
                         + (f"  {self.attack.progress()}" if self.attack else ""))


# -- the command ----------------------------------------------------------------------------------------


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """``--hostile``'s own flags (``--url``, ``--budget``, ``--scenes`` and ``--out`` are ``load``'s)."""
    d = HostileOptions()
    group.add_argument("--clients", type=int, default=d.clients, help="normal closed-loop clients (default %(default)s)")
    group.add_argument("--hostile-seconds", type=float, default=d.phase_s,
                       help="seconds measured per phase (default %(default)s)")
    group.add_argument("--hostile-warmup", type=float, default=d.warmup_s,
                       help="seconds of each attack before its measured window (default %(default)s)")
    group.add_argument("--slow-bodies", type=int, default=d.slow_bodies,
                       help="connections that declare a frame's Content-Length and send 1 byte/s (default %(default)s)")
    group.add_argument("--slow-headers", type=int, default=d.slow_headers,
                       help="connections that send a request line, then a header byte a second (default %(default)s)")
    group.add_argument("--idle-connections", type=int, default=d.idle,
                       help="connections that send nothing (default %(default)s)")
    group.add_argument("--bomb-clients", type=int, default=d.bomb_clients,
                       help="clients posting progressive-JPEG scan bombs back to back (default %(default)s)")
    group.add_argument("--png-senders", type=int, default=d.png_senders,
                       help="clients posting a PNG of zeros of --png-size back to back (default %(default)s)")
    group.add_argument("--bomb-bytes", type=int, default=d.bomb_bytes, help="size of a scan bomb (default %(default)s)")
    group.add_argument("--png-size", default="x".join(map(str, d.png_size)), metavar="WxH",
                       help="the PNG senders' image (default %(default)s: 39.8 MP)")
    group.add_argument("--attacks", default=",".join(d.attacks),
                       help="attack phases to run, in this order: %(default)s")
    group.add_argument("--attackers-nice", type=int, default=d.attackers_nice, metavar="N",
                       help="niceness of the attackers (this process; the normal client keeps its own): at the "
                       "default %(default)s they use only CPU the server leaves, as attackers on other machines "
                       "would; 0 lets a flood's own client work compete with the server")
    group.add_argument("--distinct-hosts", action="store_true",
                       help=f"each normal client from a loopback address of its own ({NORMAL_SOURCE_PREFIX}1, 2, …) "
                       f"and every attacker from {ATTACKER_SOURCE}, as distinct hosts are seen by a front proxy's "
                       "per-address limits (festival-serve up --public); needs a loopback --url")


def options_from(args: argparse.Namespace) -> HostileOptions:
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}; the attacks are: {', '.join(ATTACKS)}")
    try:
        width, height = (int(v) for v in args.png_size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--png-size must be WIDTHxHEIGHT, got {args.png_size!r}") from None
    return HostileOptions(clients=args.clients, budget_s=args.budget, warmup_s=args.hostile_warmup,
                          phase_s=args.hostile_seconds, slow_bodies=args.slow_bodies, slow_headers=args.slow_headers,
                          idle=args.idle_connections, bomb_clients=args.bomb_clients, png_senders=args.png_senders,
                          bomb_bytes=args.bomb_bytes, png_size=(width, height),
                          attacks=tuple(a for a in ATTACKS if a in attacks), distinct_hosts=args.distinct_hosts,
                          attackers_nice=args.attackers_nice)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (500 idle connections need 500 descriptors);
    returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def cmd_hostile(args: argparse.Namespace) -> int:
    from festival_serve.serving.imaging import encode_jpeg
    from festival_serve.world.synth import generate_scene, scene_seeds

    def log(line: str) -> None:
        print(f"festival-serve load --hostile: {line}", file=sys.stderr, flush=True)

    try:
        options = options_from(args)
    except ValueError as e:
        print(f"festival-serve load: {e}", file=sys.stderr)
        return 2
    limit = raise_fd_limit()
    needed = options.slow_bodies + options.slow_headers + options.idle + options.bomb_clients + options.png_senders + 64
    if limit < needed:
        log(f"the open-file limit is {limit} and the attacks need ~{needed}: some connects will fail (ulimit -n)")
    target = Target.of(args.url)
    bodies = [encode_jpeg(generate_scene(seed).image) for seed in scene_seeds("test", args.scenes)]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per attacker request otherwise
    if (problem := _reachable(target, bodies[0], options.budget_s, log)) is not None:
        print(f"festival-serve load: {target.url} {problem}; is the server running?", file=sys.stderr)
        return 1
    payloads = build_payloads(bodies[0], options, log)
    log(f"{target.url}: {options.clients} normal clients, budget {options.budget_s:g} s; phases quiet, "
        f"{', '.join(options.attacks)}, recovery")
    report = asyncio.run(run(target, bodies, payloads, options, log))
    verdict = judge(report["phases"], report["recovery_s"]) if report["complete"] else {
        "met": False, "missed": ["the run stopped early (no baseline; its stderr says why)"]}
    full = {"url": args.url, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {f.name: getattr(options, f.name) for f in fields(options)},
            "payloads": payloads.summary(), **verdict, "phases": report["phases"]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hostile.json"
    path.write_text(json.dumps(full, indent=1))
    print(table(full))
    print(f"festival-serve load: wrote {path}")
    return 0 if report["complete"] else 1


def build_payloads(frame: bytes, options: HostileOptions, log: Callable[[str], None]) -> Payloads:
    """The scan bombs (one per kind of refinement scan, timed through Pillow here) and the PNG; said on stderr."""
    bombs = [scan_bomb(options.bomb_bytes, variant=v) for v in range(2)] if "scan_bombs" in options.attacks else []
    payloads = Payloads(frame, bombs, zeros_png(*options.png_size) if "big_png" in options.attacks else b"",
                        options.png_size, [decode_seconds(bomb) for bomb in bombs])
    for bomb, seconds in zip(bombs, payloads.bomb_decode_s):
        log(f"scan bomb: {len(bomb)} bytes, {count_scans(bomb)} scans, Pillow decodes it here in {seconds:.1f} s")
    if payloads.png:
        log(f"PNG: {options.png_size[0]}x{options.png_size[1]} zeros, {len(payloads.png)} bytes")
    return payloads


def _reachable(target: Target, frame: bytes, budget_s: float, log: Callable[[str], None]) -> str | None:
    """None once the server is ready (``/readyz`` 200, or a server without one) and one POST of ``frame`` got an
    HTTP answer, else what went wrong. A graph still loading a replica steals the CPU its quiet phase measures."""
    import httpx

    readyz = f"{'https' if target.tls else 'http'}://{target.host}:{target.port}" \
        f"{target.path.removesuffix('/v1/analyze')}/readyz"
    deadline = time.monotonic() + READY_WAIT_S
    try:
        while (status := httpx.get(readyz, timeout=10, verify=False).status_code) not in (200, 404, 405):
            if time.monotonic() > deadline:
                log(f"{readyz} still answers {status} after {READY_WAIT_S:g} s; measuring anyway")
                break
            time.sleep(1.0)
        httpx.post(target.url, content=frame, params={"describe": "false"}, timeout=budget_s + 30, verify=False,
                   headers={"content-type": "image/jpeg"})
    except httpx.HTTPError as e:
        return f"does not answer ({type(e).__name__}: {e})"
    return None


# -- the table ------------------------------------------------------------------------------------------


def table(report: dict) -> str:
    """The report as a plain-text table: one row per phase, the targets beside the numbers."""
    header = ("phase", "attack", "good/s", "x quiet", "p95 ms", "normal statuses", "how the attackers were answered",
              "attackers' cores", "target")
    rows = [header]
    for phase in report["phases"]:
        normal = phase["normal"]
        ratio = normal.get("ratio_to_quiet")
        verdict = f"{phase['target']}: {'met' if phase['met'] else 'MISSED'}" if "target" in phase else "baseline"
        if phase["name"] == "recovery":
            recovery = report.get("recovery_s")
            verdict = (f"recovered in {recovery:g} s" if recovery is not None else
                       f"not recovered in {RECOVERY_CAP_S:g} s") + f" (<= {RECOVERY_TARGET_S:g} s): " + \
                ("met" if phase.get("met") else "MISSED")
        rows.append((phase["name"], phase["attack"], f"{normal['goodput_rps']:.2f}",
                     "-" if ratio is None else f"{ratio:.2f}", _fmt(normal["p95_ms"]),
                     " ".join(f"{k}:{v}" for k, v in normal["statuses"].items()),
                     describe_attackers(phase["attackers"]), _fmt(phase.get("attackers_cpu_per_s"), ".2f"), verdict))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    missed = report.get("missed")
    lines.append(f"targets: every attack >= {GOODPUT_RATIO_TARGET:g} x quiet goodput, recovery <= "
                 f"{RECOVERY_TARGET_S:g} s: {'met' if report.get('met') else 'MISSED (' + ', '.join(missed) + ')'}")
    return "\n".join(lines)


def describe_attackers(summary: dict | None) -> str:
    """One cell: how the server answered a phase's attackers."""
    if summary is None:
        return "-"
    if "connections" in summary:  # raw connections
        ended = summary["ended_by_server"]
        parts = [f"{how} x{e['count']} after {e['after_s_median']:.1f} s (median)" for how, e in ended.items()]
        text = (f"ended by server: {', '.join(parts)}; " if parts else "none ended by the server; ")
        text += f"open at end {summary['open_at_end']}/{summary['attackers']}"
        if summary["connect_failed"]:
            text += f"; connects failed {summary['connect_failed']}"
        return text
    statuses = ", ".join(f"{status} x{n}" for status, n in summary["statuses"].items()) or "no answer"
    latency = summary["latency_s"]
    return (f"{statuses}; p50 {_fmt(latency['p50'], '.2f')} s, max {_fmt(latency['max'], '.2f')} s; "
            f"in flight at end {summary['in_flight_at_end']}")


def _percentile(values: list[float], q: float) -> float | None:
    return _round(float(np.percentile(values, q))) if values else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _fmt(value: float | None, spec: str = "g") -> str:
    return "-" if value is None else format(value, spec)
