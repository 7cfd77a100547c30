"""GraphMetricPolicy (festival_serve.serving.autoscaling) on Serve's own AutoscalingContext, and the load meters the
replicas report from; serve_config.yaml names only metrics the replicas report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from festival_serve.serving.autoscaling import METRICS, GraphMetricPolicy, InFlight, RateMeter

ROOT = Path(__file__).resolve().parents[1]


def _context(metrics: dict | None, *, replicas: int = 2, ongoing: float = 0.0, target_ongoing: float = 8):
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target_ongoing)
    return AutoscalingContext(
        deployment_id=DeploymentID("SignReader", "festival"), deployment_name="SignReader", app_name="festival",
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=[],
        total_num_requests=ongoing, total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config)


def test_replicas_follow_the_reported_load_over_the_target():
    policy = GraphMetricPolicy("crops_in_flight", target_per_replica=16)
    # Two replicas each holding 40 crops (2.5 frames of 16 crops: only 5 requests, which the queue-length rule at
    # 8 requests a replica would read as 0.6 of a replica).
    desired, _ = policy(_context({"crops_in_flight": {"r1": 40.0, "r2": 40.0}}, ongoing=5))
    assert desired == pytest.approx(5.0)
    desired, _ = policy(_context({"crops_in_flight": {"r1": 2.0, "r2": 0.0}}, ongoing=1))
    assert desired == pytest.approx(0.125)  # Serve's min_replicas and downscale delay apply after


def test_until_a_replica_reports_serves_queue_length_rule_decides():
    policy = GraphMetricPolicy("arrivals_per_s", target_per_replica=40)
    desired, _ = policy(_context(None, replicas=2, ongoing=32, target_ongoing=8))
    assert desired == pytest.approx(4.0)  # 32 requests / 8 a replica
    desired, _ = policy(_context({"crops_in_flight": {"r1": 3.0}}, replicas=2, ongoing=8, target_ongoing=8))
    assert desired == pytest.approx(1.0)  # another metric is no answer either


def test_the_policy_refuses_an_unknown_metric_or_target():
    with pytest.raises(ValueError, match="crops_in_flight"):
        GraphMetricPolicy("crops", target_per_replica=16)
    with pytest.raises(ValueError, match="> 0"):
        GraphMetricPolicy("crops_in_flight", target_per_replica=0)


def test_serve_config_names_metrics_the_replicas_report_with_policies_that_load():
    from ray.serve.config import AutoscalingPolicy

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    named = {}
    for deployment in config["applications"][0]["deployments"]:
        policy = deployment["autoscaling_config"].get("policy")
        if policy:
            loaded = AutoscalingPolicy(**policy).get_policy()(**policy["policy_kwargs"])  # as Serve's controller does
            named[deployment["name"]] = loaded.metric
    assert named == {"SignDetector": "frames_in_flight", "HazardCells": "frames_in_flight",
                     "SignReader": "crops_in_flight", "SceneDescriber": "tokens_in_flight",
                     "PipelineIngress": "arrivals_per_s"}
    assert set(named.values()) <= set(METRICS)


def test_work_in_flight_is_held_until_answered_even_on_error():
    load = InFlight()
    with load.add(3):
        with pytest.raises(RuntimeError):
            with load.add(5):
                assert load.total == 8
                raise RuntimeError("the batch failed")
        assert load.total == 3
    assert load.total == 0


def test_arrival_rate_counts_the_last_window_only():
    meter = RateMeter(window_s=10)
    for t in range(50):
        meter.mark(now=100 + t * 0.2)  # 5 a second for 10 s
    assert meter.rate(now=110) == pytest.approx(5.0, abs=0.1)
    assert meter.rate(now=115) == pytest.approx(2.5, abs=0.15)
    assert meter.rate(now=130) == 0.0
