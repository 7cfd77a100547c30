"""Admission control: predict each stage's wait from what this ingress sees, and turn away or trim work
that cannot finish inside its budget.

Each ingress replica tracks, per stage, the items it has in flight there and an estimate of the time
one item costs (``StageLoad``). A call of ``n`` items that found ``q`` items ahead of it and took
``L`` seconds says one item costs about ``L / (q + n)`` seconds (items are served roughly in order,
batching included); an exponentially weighted mean of those samples predicts the wait of the next
call as ``(in_flight + n) × cost``. At low load that is the call's own latency; under a crowd it is
the queue's drain time. With several ingress replicas each sees only its own share of the queue, and
its cost samples scale by the same share, so the prediction stays right without coordination.

``Admission.admit`` rejects a request up front when the safety stages (signs, hazards) alone would
already take more than the wait it is given (``flow.admit``: a fraction of what is left of the budget),
with a ``Retry-After`` equal to how long the queue needs to drain that far;
``reader_items`` and ``describer_fits`` let the flow read fewer signs or skip the description when
only those would miss it. No Ray import: the baseline server uses it too.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

from festival_serve.pipeline.stages import SAFETY_STAGES, STAGE_NAMES

#: Weight of the newest sample in the per-item cost average: ~10 calls of memory, enough to follow a
#: surge within a second or two at festival rates without jumping on one slow batch.
COST_SMOOTHING = 0.2
#: An estimate nothing has confirmed for this long, with nothing in flight, is forgotten (seconds). Without
#: this, a stage that timed out (a dead node) leaves a huge cost behind, every request is then refused,
#: no call is made, and the estimate can never learn that the stage is back: measured, a local cluster
#: that lost a node refused everything for the rest of the run although Serve had replaced the replicas.
STALE_AFTER_S = 2.0


@dataclass
class StageLoad:
    """One stage as this ingress sees it: items in flight, and the smoothed cost of one item (seconds)."""

    in_flight: int = 0
    item_seconds: float | None = None  # None until a call has come back
    learnt_at: float = field(default_factory=time.monotonic)  # of the last sample (or of a given estimate)

    def begin(self, items: int) -> int:
        """Count ``items`` in; returns how many were ahead of them."""
        ahead = self.in_flight
        self.in_flight += items
        return ahead

    def end(self, items: int, ahead: int, seconds: float, *, completed: bool) -> None:
        """Count ``items`` out; a completed call updates the cost estimate (failures say nothing of it)."""
        self.in_flight = max(0, self.in_flight - items)
        if completed and items > 0:
            sample = seconds / (ahead + items)
            self.item_seconds = sample if self.item_seconds is None else (
                COST_SMOOTHING * sample + (1 - COST_SMOOTHING) * self.item_seconds)
            self.learnt_at = time.monotonic()

    def cost(self, pending: int = 0) -> float | None:
        """Seconds one item costs, or None when nothing is known: no call has come back yet, or the estimate is
        stale (``STALE_AFTER_S``) and nothing is in flight or ``pending`` to refresh it; the next call then
        teaches it again."""
        idle = self.in_flight + pending == 0
        if self.item_seconds is None or (idle and time.monotonic() - self.learnt_at > STALE_AFTER_S):
            return None
        return self.item_seconds

    def predicted_wait(self, items: int = 1, pending: int = 0) -> float:
        """Seconds until ``items`` more would come back (0 when nothing is known: admit). ``pending`` items are
        ahead of them without having been sent yet (admitted frames still being read or decoded)."""
        cost = self.cost(pending)
        return 0.0 if cost is None else (self.in_flight + pending + items) * cost


@dataclass
class Admission:
    """The per-stage loads of one ingress, and the decisions taken from them."""

    loads: dict[str, StageLoad] = field(default_factory=lambda: {name: StageLoad() for name in STAGE_NAMES})
    #: Frames admitted but not yet sent to the safety stages (their body is being read or decoded). They are
    #: ahead of the next frame too: without them a burst is admitted whole while the first frames decode, and
    #: a forgotten estimate (nothing in flight *yet*) opened the gate to every arrival (measured: a 5x point
    #: that stalled the ingress for seconds).
    waiting: int = 0

    def safety_wait(self) -> float:
        """Predicted seconds until both safety stages would answer a new frame (they run concurrently)."""
        return max(self.loads[name].predicted_wait(1, self.waiting) for name in SAFETY_STAGES)

    def admit(self, allowed_wait_s: float) -> float | None:
        """None to admit a request that may wait ``allowed_wait_s``; else its ``Retry-After`` (whole seconds, >= 1)."""
        wait = self.safety_wait()
        if wait <= allowed_wait_s:
            return None
        return float(max(1, math.ceil(wait - allowed_wait_s)))

    def reader_items(self, wanted: int, remaining_s: float) -> int:
        """How many of ``wanted`` crops the reader can return within ``remaining_s`` (most first)."""
        load = self.loads["sign_reader"]
        cost = load.cost()
        if wanted == 0 or cost is None:
            return wanted
        fits = math.floor(remaining_s / cost) - load.in_flight
        return max(0, min(wanted, fits))

    def describer_fits(self, remaining_s: float) -> bool:
        return self.loads["scene_describer"].predicted_wait(1) <= remaining_s


@dataclass(frozen=True)
class Budget:
    """A request's time budget: seconds from its arrival (``time.monotonic`` in this process)."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def deadline_unix(self) -> float:
        """The deadline as wall-clock time, for other processes (model replicas) to compare against."""
        return time.time() + self.remaining()


class TokenBucket:
    """At most ``rate_per_s`` takes a second on average, with bursts of up to one second's worth."""

    def __init__(self, rate_per_s: float) -> None:
        self.rate, self.capacity = rate_per_s, max(1.0, rate_per_s)
        self.tokens, self.updated = self.capacity, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def retry_after_s(self) -> float:
        """Seconds until the next take would succeed."""
        return max(0.0, (1 - self.tokens) / self.rate)


class Uploads:
    """The request bodies one replica is reading now, capped twice: at most ``count`` at once, and at most
    ``max_bytes`` of them held in memory (what has arrived so far, summed). A body trickling in holds a slot and
    almost no memory, so the count can be high (each slot is a waiting coroutine and an ongoing request of Serve's);
    the bytes bound the memory however large the bodies are. The caller refuses when ``full`` or when ``take``
    says no."""

    def __init__(self, count: int, max_bytes: int) -> None:
        self.count, self.max_bytes = count, max_bytes
        self.reading, self.held_bytes = 0, 0

    @property
    def full(self) -> bool:
        return self.reading >= self.count

    @contextlib.contextmanager
    def body(self):
        """One body being read: yields its ``take(n) -> bool`` (hold n more bytes, if they fit); all it took is
        given back when it ends (the bytes then belong to the request, which admission and decoding bound)."""
        taken = 0

        def take(n: int) -> bool:
            nonlocal taken
            if self.held_bytes + n > self.max_bytes:
                return False
            self.held_bytes += n
            taken += n
            return True

        self.reading += 1
        try:
            yield take
        finally:
            self.reading -= 1
            self.held_bytes -= taken
