"""``festival-serve load``: the day shapes, the time-varying arrivals, and the per-second report end to end
against a real HTTP server (the bench tests' controllable one)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from festival_serve.measure import loadgen
from festival_serve.cli import main
from festival_serve.measure.load_profiles import BUILT_IN, Profile, load_profile
from tests.test_bench import fake_server  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]


def test_festival_day_ramps_surges_and_lulls():
    day = BUILT_IN["festival"]
    assert day.multiple(0.0) < day.multiple(0.2) == pytest.approx(0.8)  # the morning ramp
    surge = [t / 1000 for t in range(1001) if day.multiple(t / 1000) >= 4.0]
    assert surge and 0.09 <= surge[-1] - surge[0] <= 0.11  # several times capacity for a tenth of the run
    assert day.multiple(0.95) < day.multiple(0.4) / 4  # the evening lull
    assert day.peak() == 4.0


def test_other_shapes():
    assert {BUILT_IN["steady"].multiple(t) for t in (0, 0.3, 1)} == {1.0}
    ramp = [BUILT_IN["ramp"].multiple(t / 10) for t in range(11)]
    assert ramp == sorted(ramp) and ramp[0] == pytest.approx(0.1) and ramp[-1] == pytest.approx(3.0)
    surge = BUILT_IN["surge"]
    assert surge.multiple(0.3) == 0.5 and surge.multiple(0.5) == 5.0 and surge.multiple(0.7) == 0.5


def test_custom_profile_files_and_bad_ones(tmp_path):
    path = tmp_path / "concert.yaml"
    path.write_text("points: [[0, 0.5], [0.5, 2], [1, 0.5]]\n")
    profile = load_profile(str(path))
    assert profile.name == "concert" and profile.multiple(0.25) == pytest.approx(1.25)
    (tmp_path / "bad.json").write_text(json.dumps({"points": [[0.2, 1], [1, 1]]}))
    with pytest.raises(ValueError, match="start at t=0"):
        load_profile(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("carnival")
    with pytest.raises(ValueError, match=">= 0"):
        Profile("negative", ((0, 1), (1, -1)))


def test_arrivals_follow_a_time_varying_rate():
    """Thinning: nothing in the first half, ~200/s in the second."""
    sent: list[float] = []

    def launch(i, scheduled, in_flight):
        sent.append(scheduled)
        return None

    began = time.perf_counter()
    asyncio.run(loadgen._poisson_arrivals(lambda t: 0.0 if t < 0.5 else 200.0, 1.0, 0, launch))
    assert min(sent) - began >= 0.49  # none in the first half
    offsets = [t - sent[0] for t in sent]
    assert 60 <= len(sent) <= 140  # 100 expected
    assert max(offsets) <= 0.5  # all within the second half (0.5 s wide)


def test_load_writes_per_second_rows_and_a_plot(fake_server, tmp_path, capsys):  # noqa: F811
    base = fake_server.removesuffix("/v1/analyze")
    assert main(["load", "--url", base, "--profile", "surge", "--duration", "3", "--capacity", "20",
                 "--ray-address", "none", "--scenes", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "surge.json").read_text())
    assert (tmp_path / "surge.png").stat().st_size > 0
    rows, summary = report["seconds"], report["summary"]
    assert [row["second"] for row in rows] == [0, 1, 2]
    assert rows[1]["offered_rps"] == pytest.approx(100.0)  # 5x capacity in the middle fifth: 1.2-1.8 s
    assert summary["sent"] == sum(row["sent"] for row in rows) > 0
    assert summary["sent"] == summary["answered"] + summary["shed"] + summary["error"] + summary["lost"] + summary["hung"]
    assert summary["hung"] == 0 and summary["lost"] == 0 and summary["answered"] > 0
    assert all("p95_ms" in row for row in rows if row.get("good"))
    assert "profile surge" in capsys.readouterr().out


def test_fault_report_measures_recovery_against_the_goodput_before():
    from festival_serve.measure.load import fault_report

    rows = ([{"second": s, "sent": 10, "good": 10} for s in range(20)]
            + [{"second": 20 + s, "sent": 10, "good": 2, "shed_fast": 8} for s in range(6)]
            + [{"second": 26 + s, "sent": 10, "good": 10} for s in range(14)])
    report = fault_report(rows, {"t": 20.4, "kind": "node"})
    assert report["goodput_before_rps"] == 10 and report["recovery_s"] == 6
    assert report["outcomes_until_recovered"]["shed_fast"] == 48 and report["outcomes_until_recovered"]["lost"] == 0
    never = fault_report(rows[:26], {"t": 20, "kind": "replica"})
    assert never["recovery_s"] is None


def test_updates_change_one_value_and_leave_the_rest():
    import yaml

    from festival_serve.measure.faults import updated_config

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    tuned, change = updated_config(config, "user_config")
    detector = {d["name"]: d for d in tuned["applications"][0]["deployments"]}["SignDetector"]
    assert detector["user_config"]["batch_wait_timeout_s"] == 0.002 and "0.001 -> 0.002" in change
    assert tuned["applications"][0]["args"] == config["applications"][0]["args"]
    moved, change = updated_config(config, "args")
    assert moved["applications"][0]["args"]["sign_detector"]["confidence"] == 0.16 and "0.15 -> 0.16" in change
    assert moved["applications"][0]["deployments"] == config["applications"][0]["deployments"]
    assert config["applications"][0]["args"]["sign_detector"]["confidence"] == 0.15  # the input is left alone
    with pytest.raises(ValueError, match="user_config, args"):
        updated_config(config, "code")


def test_two_runs_replicas_are_plotted_side_by_side(tmp_path):
    from festival_serve.measure.load import plot_replicas

    def run(reader_replicas):
        rows = [{"second": s, "offered_rps": 5.0, "replicas": {"SignReader": reader_replicas(s), "PipelineIngress": 1}}
                for s in range(30)]
        return {"seconds": rows, "summary": {"max_replicas": {"SignReader": max(reader_replicas(s) for s in range(30)),
                                                              "PipelineIngress": 1}}}

    path = plot_replicas({"graph": run(lambda s: 2 if 10 <= s < 20 else 1), "queue-length": run(lambda s: 1)},
                         tmp_path / "both.png")
    assert path.stat().st_size > 0
    assert plot_replicas({"no counts": {"seconds": [], "summary": {"max_replicas": {}}}}, tmp_path / "x.png") is None
