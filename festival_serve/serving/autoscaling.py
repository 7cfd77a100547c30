"""Autoscaling on the graph's own measure of load, where Serve's queue length measures the wrong thing.

Serve's default policy scales a deployment by requests in flight per replica. That is wrong for every stage
of the graph:

- a **detector**'s request may carry several frames (the ingress sends the calls it makes together as one
  request, ``festival_serve.serving.coalesce``): its load is frames;
- the **reader**'s request is one frame's crops, 0 to 16 of them: its load is crops, not requests;
- the **describer**'s request is one frame, but its cost is the tokens it may generate (``max_new_tokens``):
  a target in frames silently changes meaning when ``max_new_tokens`` does;
- the **ingress** holds each admitted request for the whole graph's latency while it only awaits, and sheds
  the rest in milliseconds: its requests in flight stay flat in a surge while its real work (decoding and
  refusing arrivals, CPU per request) grows with the arrival rate.

So each replica reports its own load (``record_autoscaling_stats``: frames, crops or token budget in flight,
arrivals per second), and ``GraphMetricPolicy`` (named in ``serve_config.yaml`` with its metric and its
target per replica) asks for ``load / target`` replicas. Serve still applies the config's min/max replicas,
up/down delays and scaling factors around it.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: The metric names replicas report and ``serve_config.yaml`` names.
FRAMES_IN_FLIGHT = "frames_in_flight"
CROPS_IN_FLIGHT = "crops_in_flight"
TOKENS_IN_FLIGHT = "tokens_in_flight"
ARRIVALS_PER_S = "arrivals_per_s"
METRICS = (FRAMES_IN_FLIGHT, CROPS_IN_FLIGHT, TOKENS_IN_FLIGHT, ARRIVALS_PER_S)


def desired_replicas(per_replica_load: dict[Any, float], target_per_replica: float) -> float:
    """Replicas wanted for a total load (the sum of what each running replica reports) at ``target_per_replica``
    each; not rounded (Serve's scaling factors and bounds come after)."""
    return sum(per_replica_load.values()) / target_per_replica


class GraphMetricPolicy:
    """A Serve autoscaling policy (``autoscaling_config.policy.policy_function``): replicas = the deployment's
    reported ``metric``, summed over its replicas, / ``target_per_replica``. Until a replica reports the metric
    (a replica just started), Serve's default queue-length policy decides."""

    def __init__(self, metric: str, target_per_replica: float) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown autoscaling metric {metric!r}; the replicas report {', '.join(METRICS)}")
        if not target_per_replica > 0:
            raise ValueError(f"target_per_replica must be > 0, got {target_per_replica}")
        self.metric = metric
        self.target_per_replica = float(target_per_replica)

    def __call__(self, ctx) -> tuple[float, dict]:
        """``ctx``: Serve's ``AutoscalingContext`` → (desired replicas, policy state)."""
        load = (ctx.aggregated_metrics or {}).get(self.metric)
        if not load or ctx.current_num_replicas == 0:
            from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

            return replica_queue_length_autoscaling_policy(ctx)
        return desired_replicas(load, self.target_per_replica), {}


@dataclass
class InFlight:
    """Work a replica has accepted and not yet answered (queued for a batch or running), in the stage's unit."""

    total: float = 0.0

    @contextlib.contextmanager
    def add(self, weight: float) -> Iterator[None]:
        self.total += weight
        try:
            yield
        finally:
            self.total -= weight


@dataclass
class RateMeter:
    """Events per second over the last ``window_s`` seconds (``time.monotonic``)."""

    window_s: float = 10.0
    _times: collections.deque = field(default_factory=collections.deque)

    def mark(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._times.append(now)
        self._forget(now)  # bounded by rate x window even if nobody reads the rate

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._forget(now)
        return len(self._times) / self.window_s

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
