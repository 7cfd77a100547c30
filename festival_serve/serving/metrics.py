"""The pipeline's own Prometheus metrics, recorded through ``ray.serve.metrics`` and exported by Ray.

Ray exports every process's metrics on one port per node (``festival-serve up --metrics-port``, 8080 by
default; ``ray start --metrics-export-port`` on a cluster) and prefixes custom metrics with ``ray_``:
``festival_stage_latency_seconds`` below is scraped as ``ray_festival_stage_latency_seconds``. Serve adds
the labels ``deployment``, ``replica`` and ``application`` to each; ours add only ``stage``, ``outcome``
and ``code``, whose values come from fixed sets (the stage table, the outcomes below, the API's and the
flow's stable error codes), never a request id or a path.

Where each is measured:

- the ingress (``record_answer``; ``record_refusal``, which the error mapper calls), once per ``/v1/analyze``
  request that reached the handler (a request refused for its API key, or by the router, never does; Ray's
  ``ray_serve_num_http_requests_total`` counts those by status): the answer's outcome, the latency of
  each stage as the ingress waited for it (the answer's ``timings_ms``), and the whole answer's;
- the model replicas (``record_stage_request``), once per Serve request: how many calls it carried;
- the model replicas (``record_batch``), once per batch in ``ModelDeployment._run_batch``: its size, each
  item's wait between the ingress sending it and the batch starting (``time.time()`` on two machines:
  clock skew between nodes adds to it), and the items dropped because their deadline passed meanwhile.

Ray Serve keeps its own series beside these (``ray_serve_num_http_requests_total``,
``ray_serve_http_request_latency_ms``, ``ray_serve_deployment_processing_latency_ms``,
``ray_serve_deployment_queued_queries``, ``ray_serve_replica_processing_queries`` …; batch sizes and waits
are only ours: the models batch with ``festival_serve.serving.batching.PacedBatcher``, not ``@serve.batch``); the
README's "Metrics" section lists both and ``cluster/grafana-dashboard.json`` plots both.

The metric objects are made once per process, on first use: Serve's labels are read from the replica
that makes them, and a process that records nothing (the CLI, the baseline, the tests) never needs Ray.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from festival_serve.pipeline.stages import STAGE_NAMES, Stage

Outcome = Literal["ok", "degraded", "shed", "rejected", "client_closed", "error"]

#: The steps of an answer's ``timings_ms`` that are recorded as stages: decoding, then the model stages.
#: (``total`` is the whole answer: its own histogram, so that summing over stages never counts it twice.)
TIMED_STEPS: tuple[str, ...] = ("decode", *STAGE_NAMES)

#: Latency and queue-wait buckets, seconds. Dense from 0.5 ms (a batch window of 1 ms is common, and GPU
#: stages take a few ms) through 100 ms–1 s, where the crowd's budgets and the CPU stages live, up to 30 s,
#: the largest budget a client may ask for (``ingress.max_budget_s``): whatever the ingress waited for
#: within any allowed budget falls in a finite bucket, so p99 is an interpolation, never ``+Inf``. (Quantiles
#: come from the buckets; Ray approximates these histograms' ``_sum`` from bucket midpoints, see below.)
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0,
)

#: Batch-size buckets per unit of a stage's items (``Stage.batch_unit``), on half-integer edges: a batch of 3
#: is counted under ``le="3.5"``. Ray exports a histogram's ``_sum`` rebuilt from bucket midpoints, not from
#: the observed values (``ray/_private/telemetry/open_telemetry_metric_recorder.py``), so with these edges
#: every size up to 4 comes back exactly and the mean batch size (``_sum / _count``) stays close; integer
#: edges would read each batch of 1 as 0.5. The largest edges hold the batch caps ``serve_config.yaml``
#: sets (16 frames, 8 for the describer; 32 crops) with room for a raised one.
BATCH_BUCKETS: dict[str, tuple[float, ...]] = {
    "frames": (0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5),
    "crops": (0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5),
}


def answer_outcome(answer: Mapping[str, Any]) -> Outcome:
    """``degraded`` when the answer lists a stage that did not deliver, else ``ok``."""
    return "degraded" if answer.get("degraded") else "ok"


def refusal_outcome(status: int, code: str) -> Outcome:
    """A refusal by status and error code: ``shed`` when the flow turned it away for load (code ``overloaded``,
    from admission control or a full queue), ``client_closed`` when the client left before its answer (not an error
    of ours: an error-rate alert must not page anyone for clients that hang up), ``rejected`` for any other client
    error, else ``error``."""
    if code == "overloaded":
        return "shed"
    if code == "client_closed":
        return "client_closed"
    return "rejected" if 400 <= status < 500 else "error"


@dataclass(frozen=True)
class _Metrics:
    stage_latency: Any
    answer_latency: Any
    answers: Any
    degraded: Any
    queue_wait: Any
    batch_size: dict[str, Any]  # by Stage.batch_unit
    expired: Any
    request_calls: Any
    stream_frames: Any
    stream_events: Any
    stream_latency: Any
    streams_open: Any


@functools.cache
def _metrics() -> _Metrics:
    from ray.serve.metrics import Counter, Gauge, Histogram

    def seconds(name: str, description: str, label: str) -> Any:
        return Histogram(name, description, boundaries=list(SECONDS_BUCKETS), tag_keys=(label,))

    return _Metrics(
        stage_latency=seconds("festival_stage_latency_seconds", "Time the ingress waited for each step of an "
                              "answer (decode, then each model stage, bounded by the request's budget).", "stage"),
        answer_latency=seconds("festival_answer_latency_seconds", "Time from a request reaching the ingress's "
                               "handler to its 200 answer being built, by outcome (ok or degraded).", "outcome"),
        answers=Counter("festival_answers_total", "/v1/analyze requests answered, by outcome (ok, degraded, shed, "
                        "rejected, client_closed, error) and, for refusals, error code.", tag_keys=("outcome", "code")),
        degraded=Counter("festival_degraded_stages_total", "Entries of answers' degraded lists: a stage that did "
                         "not deliver, by stage and code.", tag_keys=("stage", "code")),
        queue_wait=seconds("festival_queue_wait_seconds", "Per item, from the ingress sending it to its batch "
                           "starting in a model replica.", "stage"),
        batch_size={unit: Histogram(f"festival_batch_size_{unit}", f"Batch sizes in {unit}, per stage.",
                                    boundaries=list(buckets), tag_keys=("stage",))
                    for unit, buckets in BATCH_BUCKETS.items()},
        request_calls=Histogram("festival_stage_request_frames", "Frames (calls: one frame's work each) per Serve "
                                "request a model replica received: the ingress sends a stage's waiting calls together "
                                "(festival_serve.serving.coalesce).",
                                boundaries=list(BATCH_BUCKETS["frames"]), tag_keys=("stage",)),
        expired=Counter("festival_expired_items_total", "Items dropped unrun because their deadline passed while "
                        "they queued at a stage (frames; crops for the reader).", tag_keys=("stage",)),
        stream_frames=Counter("festival_stream_frames_total", "Frames of WS /v1/streams by outcome: analysed "
                              "(through the graph), predicted (by the tracker between analysed frames), dropped "
                              "(stale on a live source, or over capacity), error (refused for that frame).",
                              tag_keys=("outcome",)),
        stream_events=Counter("festival_stream_events_total", "Events the streams announced, by type "
                              "(sign_appeared, sign_read, sign_passed, hazard_ahead, hazard_cleared).",
                              tag_keys=("type",)),
        stream_latency=seconds("festival_stream_frame_latency_seconds", "A processed stream frame's time from "
                               "arriving at the ingress to its result, waiting for a slot included.", "outcome"),
        streams_open=Gauge("festival_streams_open", "Camera streams this ingress replica holds."),
    )


def record_answer(answer: Mapping[str, Any], timings_ms: Mapping[str, float]) -> None:
    """A 200 answer: its outcome, its degraded entries, and its timings (``timings_ms``: step → ms)."""
    metrics, outcome = _metrics(), answer_outcome(answer)
    metrics.answers.inc(1, {"outcome": outcome, "code": ""})
    for entry in answer.get("degraded") or ():
        metrics.degraded.inc(1, {"stage": entry["stage"], "code": entry["code"]})
    for step in TIMED_STEPS:
        if step in timings_ms:
            metrics.stage_latency.observe(timings_ms[step] / 1000, {"stage": step})
    if "total" in timings_ms:
        metrics.answer_latency.observe(timings_ms["total"] / 1000, {"outcome": outcome})


def record_refusal(status: int, code: str) -> None:
    """A ``/v1/analyze`` request answered with an error: its status and code as the error mapper answered them
    (the ingress hands this to ``build_http_app`` as its ``on_analyze_refusal``)."""
    _metrics().answers.inc(1, {"outcome": refusal_outcome(status, code), "code": code})


def record_stage_request(stage: Stage, calls: int) -> None:
    """One Serve request to ``stage`` carrying ``calls`` calls (``ModelDeployment.call_many``)."""
    _metrics().request_calls.observe(calls, {"stage": stage.name})


def record_batch(stage: Stage, waits_s: Sequence[float], expired: int) -> None:
    """One batch of ``len(waits_s)`` items at ``stage``: each item's queue wait (s) and how many expired."""
    metrics = _metrics()
    tags = {"stage": stage.name}
    metrics.batch_size[stage.batch_unit].observe(len(waits_s), tags)
    for wait in waits_s:
        metrics.queue_wait.observe(max(0.0, wait), tags)
    if expired:
        metrics.expired.inc(expired, tags)


def record_stream_frame(outcome: str, timings_ms: Mapping[str, float]) -> None:
    """One stream frame: analysed (through the graph) or predicted (by the tracker, ``analyze_every``), with its
    timings (``total`` and ``queued``); or dropped, or error."""
    metrics = _metrics()
    metrics.stream_frames.inc(1, {"outcome": outcome})
    if outcome in ("analysed", "predicted") and "total" in timings_ms:
        metrics.stream_latency.observe((timings_ms["total"] + timings_ms.get("queued", 0.0)) / 1000,
                                       {"outcome": outcome})


def record_stream_event(event: Mapping[str, Any]) -> None:
    _metrics().stream_events.inc(1, {"type": event["type"]})


def record_streams_open(count: int) -> None:
    _metrics().streams_open.set(count)
