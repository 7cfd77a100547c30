"""The metrics an ops team scrapes (``festival_serve.serving.metrics``), checked without Ray: their names and labels
follow Prometheus' conventions, their buckets fit the budgets and batch caps ``serve_config.yaml`` sets,
every answer and refusal is counted once under the right outcome, and the shipped scrape config and
dashboard agree with the code. ``tests/test_graph.py`` scrapes them from a live graph."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import yaml
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from festival_serve.serving import flow
from festival_serve.serving import metrics
from festival_serve.serving.errors import ApiError
from festival_serve.serving.http import ApiHandlers, build_http_app
from festival_serve.cli import build_parser, main
from festival_serve.serving.imaging import InvalidImage
from festival_serve.pipeline.settings import IngressSettings
from festival_serve.pipeline.stages import STAGE_NAMES, STAGES, stage
from tests.test_http import ingress_app

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
DASHBOARD = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())


class Recorded:
    """Stands in for a Ray metric: keeps its definition and every value recorded, with its labels."""

    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.boundaries, self.tag_keys, self.values = name, boundaries, tag_keys, []

    def inc(self, value=1.0, tags=None):
        assert value > 0  # Ray refuses to add 0 to a counter
        self._record(value, tags)

    def observe(self, value, tags=None):
        self._record(value, tags)

    def set(self, value, tags=None):
        self._record(value, tags or {})

    def _record(self, value, tags):
        assert set(tags) == set(self.tag_keys), (self.name, tags)  # Ray refuses a missing or unknown label
        self.values.append((value, dict(tags)))


class RecordedGauge(Recorded):
    """A gauge: a level, set rather than added to."""


@pytest.fixture
def recorded(monkeypatch):
    """``festival_serve.serving.metrics``' metric objects, built through its own code with ``Recorded`` for Ray's."""
    import ray.serve.metrics

    monkeypatch.setattr(ray.serve.metrics, "Counter", Recorded)
    monkeypatch.setattr(ray.serve.metrics, "Histogram", Recorded)
    monkeypatch.setattr(ray.serve.metrics, "Gauge", RecordedGauge)
    built = metrics._metrics.__wrapped__()
    monkeypatch.setattr(metrics, "_metrics", lambda: built)
    return built


def all_metrics(built) -> list[Recorded]:
    return [m for m in vars(built).values() if isinstance(m, Recorded)] + list(built.batch_size.values())


# -- names, labels, buckets ------------------------------------------------------------------------------------


def test_names_carry_their_unit_counters_end_in_total_and_labels_are_few_and_bounded(recorded):
    for metric in all_metrics(recorded):
        assert re.fullmatch(r"festival_[a-z_]+", metric.name), metric.name
        assert set(metric.tag_keys) <= {"stage", "outcome", "code", "type"}, metric.name
        if isinstance(metric, RecordedGauge):
            assert not metric.name.endswith("_total"), metric.name
        elif metric.boundaries is None:
            assert metric.name.endswith("_total"), metric.name
        else:
            assert metric.name.endswith(("_seconds", "_frames", "_crops")), metric.name
            assert list(metric.boundaries) == sorted(set(metric.boundaries)) and metric.boundaries[0] > 0


def test_latency_buckets_reach_the_largest_budget_a_client_may_ask_for():
    ingress = SERVE_CONFIG["applications"][0]["args"]["ingress"]
    assert metrics.SECONDS_BUCKETS[-1] == ingress["max_budget_s"]
    assert metrics.SECONDS_BUCKETS[0] <= 0.001  # a 1 ms batch window still has a bucket of its own


def test_every_batch_cap_has_a_finite_bucket_and_small_batches_are_their_buckets_midpoints():
    caps = {d["name"]: d["user_config"]["max_batch_size"] for d in SERVE_CONFIG["applications"][0]["deployments"]
            if "user_config" in d}
    for model in STAGES:
        edges = metrics.BATCH_BUCKETS[model.batch_unit]
        assert caps[model.deployment] <= edges[-1], model.name
    for edges in metrics.BATCH_BUCKETS.values():
        bounds = (0.0, *edges)
        for size in range(1, 5):  # Ray exports _sum from bucket midpoints: these must come back exactly
            upper = next(i for i, edge in enumerate(bounds) if edge >= size)
            assert (bounds[upper - 1] + bounds[upper]) / 2 == size


def test_the_reader_batches_crops_and_the_others_frames():
    assert {model.name: model.batch_unit for model in STAGES} == {
        "sign_detector": "frames", "hazard_cells": "frames", "sign_reader": "crops", "scene_describer": "frames"}


# -- outcomes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degraded, outcome", [
    ([], "ok"),
    ([{"stage": "scene_describer", "code": "skipped_over_budget", "message": "…"}], "degraded"),
])
def test_an_answer_is_ok_or_degraded_by_its_degraded_list(degraded, outcome):
    assert metrics.answer_outcome({"signs": [], "degraded": degraded}) == outcome


@pytest.mark.parametrize("status, code, outcome", [
    (503, "overloaded", "shed"),  # admission control, or a safety stage's queue was full
    (503, "safety_stages_unavailable", "error"),
    (400, "invalid_image", "rejected"),
    (413, "payload_too_large", "rejected"),
    (415, "unsupported_media_type", "rejected"),
    (500, "internal", "error"),
])
def test_a_refusal_is_shed_rejected_or_an_error_by_status_and_code(status, code, outcome):
    assert metrics.refusal_outcome(status, code) == outcome


def test_an_answer_counts_once_with_its_degraded_stages_and_every_step_in_seconds(recorded):
    answer = {"degraded": [{"stage": "sign_reader", "code": "partial", "message": "read 2 of 5 signs"},
                           {"stage": "scene_describer", "code": "timeout", "message": "…"}]}
    timings = {"decode": 4.0, "sign_detector": 30.0, "hazard_cells": 25.0, "sign_reader": 120.0,
               "scene_describer": 900.0, "total": 1100.0}

    metrics.record_answer(answer, timings)

    assert recorded.answers.values == [(1, {"outcome": "degraded", "code": ""})]
    assert recorded.degraded.values == [(1, {"stage": "sign_reader", "code": "partial"}),
                                        (1, {"stage": "scene_describer", "code": "timeout"})]
    assert recorded.stage_latency.values == [(timings[s] / 1000, {"stage": s}) for s in ("decode", *STAGE_NAMES)]
    assert recorded.answer_latency.values == [(1.1, {"outcome": "degraded"})]  # total is not a stage


REFUSALS = [
    (flow.Rejected(503, "overloaded", "the queues would not answer in time", 2.0), "shed", "overloaded"),
    (flow.Rejected(503, "safety_stages_unavailable", "neither safety stage answered", 1.0), "error",
     "safety_stages_unavailable"),
    (ApiError(400, "invalid_budget", "x-request-timeout-seconds must be positive"), "rejected", "invalid_budget"),
    (InvalidImage("not a decodable JPEG, PNG or WebP image"), "rejected", "invalid_image"),
    (RuntimeError("a bug"), "error", "internal"),
]


@pytest.mark.parametrize("exc, outcome, code", REFUSALS)
def test_a_refusal_is_answered_as_the_error_mapper_answers_it_and_counted_once(recorded, exc, outcome, code):
    async def analyze(request):
        raise exc

    async def ok(request):
        return JSONResponse({"status": "ok"})

    handlers = ApiHandlers(analyze=analyze, models=ok, healthz=ok, readyz=ok)
    counted = TestClient(build_http_app(handlers, keys=None, on_analyze_refusal=metrics.record_refusal))
    uncounted = TestClient(build_http_app(handlers, keys=None))

    answers = [client.post("/v1/analyze", headers={"x-request-id": "r-1"}) for client in (counted, uncounted)]

    assert [(a.status_code, a.content, a.headers.get("retry-after")) for a in answers] == \
        [(answers[1].status_code, answers[1].content, answers[1].headers.get("retry-after"))] * 2
    assert recorded.answers.values == [(1, {"outcome": outcome, "code": code})]


def test_the_ingress_counts_the_refusals_of_analyze_only(recorded):
    client = TestClient(ingress_app(IngressSettings()))

    client.post("/v1/analyze", content=b"x", headers={"x-request-timeout-seconds": "soon"})
    client.get("/v1/nothing")  # the router's 404: Ray's own series count it
    client.put("/v1/models")

    assert recorded.answers.values == [(1, {"outcome": "rejected", "code": "invalid_budget"})]


def test_a_batch_records_its_size_in_its_unit_each_wait_and_what_expired(recorded):
    metrics.record_batch(stage("sign_reader"), [0.02, 0.5, -0.001], expired=1)  # -0.001: clocks of two machines
    metrics.record_batch(stage("hazard_cells"), [0.01], expired=0)

    assert recorded.batch_size["crops"].values == [(3, {"stage": "sign_reader"})]
    assert recorded.batch_size["frames"].values == [(1, {"stage": "hazard_cells"})]
    assert [v for v, _ in recorded.queue_wait.values] == [0.02, 0.5, 0.0, 0.01]
    assert recorded.expired.values == [(1, {"stage": "sign_reader"})]  # nothing recorded for none


# -- what ships beside the code ---------------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_the_dashboard_plots_every_pipeline_metric_and_rays_own_series(recorded):
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for e in dashboard_exprs() for name in re.findall(r"ray_\w+", e)}
    ours = {f"ray_{m.name}" for m in all_metrics(recorded)}
    assert ours <= used, ours - used
    assert {"ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy"} <= used
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p.get("targets") for p in DASHBOARD["panels"] if p["type"] != "row")


def test_the_readme_names_every_metric_and_its_labels(recorded):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics"):]
    for metric in all_metrics(recorded):
        assert f"ray_{metric.name}" in section, metric.name


def test_the_scrape_config_and_up_agree_on_the_local_metrics_port():
    config = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    default = build_parser().parse_args(["up"]).metrics_port
    assert jobs["festival-local"]["static_configs"][0]["targets"] == [f"127.0.0.1:{default}"]
    assert jobs["ray-cluster"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_up_refuses_a_metrics_port_in_use_before_starting_ray(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["up", "--config", str(ROOT / "serve_config.yaml"), "--cpu", "--metrics-port", str(port)])
    assert code == 2 and f"--metrics-port {port} is in use" in capsys.readouterr().err
