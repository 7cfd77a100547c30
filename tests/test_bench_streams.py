"""``festival-serve bench --streams``: its pure parts (fairness, the fair share, latency windows, the overload
layout, ratios and targets, the report) on synthetic numbers, and the CLI's hook into ``bench``; no Ray."""

from __future__ import annotations

import argparse
import json

import pytest

from festival_serve.measure.bench import streams


def record(camera: str, fps: float, seconds: float, latency_ms, *, dropped: int = 0, reads=(1,),
           refused: str | None = None) -> dict:
    """A camera's record as ``streams.camera`` returns it: ``fps * seconds`` results, evenly sent, with
    ``latency_ms(t)`` as the server's latency and 10 ms more as the round trip."""
    count = int(round(fps * seconds))
    results = [(k / fps, latency_ms(k / fps), latency_ms(k / fps) + 10.0) for k in range(count)]
    summary = None if refused else {"received": count + dropped, "processed": count, "dropped": dropped,
                                    "tracks": [{"track_id": i, "reads": r} for i, r in enumerate(reads)]}
    return {"camera": camera, "sent": 0 if refused else count + dropped, "skipped": 0,
            "results": [] if refused else results, "errors": 0, "summary": summary, "refused": refused,
            "closed": None}


def resources(cpu_s: float, wall_s: float) -> dict:
    return {"cpu_s": cpu_s, "cpu_cores": round(cpu_s / wall_s, 3), "wall_s": wall_s}


# -- the pure parts ----------------------------------------------------------------------------------------


def test_percentile_and_fairness():
    assert streams.percentile([], 95) is None
    assert streams.percentile([float("nan"), None, 10.0], 50) == 10.0
    assert streams.percentile(list(range(101)), 95) == 95.0
    assert streams.fairness([10.0, 5.0, 8.0]) == 0.5
    assert streams.fairness([4.0, 4.0]) == 1.0
    assert streams.fairness([]) is None
    assert streams.fairness([0.0, 0.0]) is None


def test_fair_share_is_the_even_split_capped_by_what_a_stream_may_get():
    assert streams.fair_share([3.0, 3.0, 3.0], cap_fps=10.0) == 3.0
    assert streams.fair_share([12.0, 8.0], cap_fps=9.0) == 9.0  # no stream may get more than its cap
    deviations = streams.share_deviations([1.8, 1.2, 2.1, 1.3], cap_fps=10.0)  # fair share 1.6
    assert deviations == [0.125, -0.25, 0.312, -0.188]
    assert streams.share_deviations([], 10.0) == []


def test_windows_split_samples_by_time():
    samples = [(t / 10, 100.0 if t < 50 else 300.0) for t in range(100)] + [(10.2, 900.0)]  # one late sample
    rows = streams.windows(samples, window_s=5.0, duration_s=10.0)
    assert [(w["start_s"], w["end_s"]) for w in rows] == [(0.0, 5.0), (5.0, 10.0)]
    assert rows[0]["frames"] == 50 and rows[0]["p95_ms"] == 100.0
    assert rows[1]["frames"] == 51  # the late sample lands in the last window
    assert rows[1]["p50_ms"] == 300.0
    empty = streams.windows([(0.5, 10.0)], window_s=1.0, duration_s=3.0)
    assert [w["frames"] for w in empty] == [1, 0, 0] and empty[2]["p95_ms"] is None
    assert streams.windows(samples, 0.0, 10.0) == []


def test_first_last_sees_growing_latency():
    growing = [(t / 10, 100.0 + 10.0 * t) for t in range(1200)]  # 120 s, latency climbing
    fl = streams.first_last(growing, duration_s=120.0)
    assert fl["span_s"] == 30.0
    assert fl["p95_growth"] > 3
    flat = [(t / 10, 200.0) for t in range(300)]  # 30 s run: windows of 10 s, no overlap
    fl = streams.first_last(flat, duration_s=30.0)
    assert fl["span_s"] == 10.0 and fl["p95_growth"] == 1.0
    assert streams.first_last([], duration_s=10.0)["p95_growth"] is None


def test_overload_layout_adds_streams_then_raises_fps():
    assert streams.overload_layout(10.644, 3.0, 10.0, 2, 32) == (4, 10.0)  # ceil(31.9 / 10)
    assert streams.overload_layout(30.0, 3.0, 10.0, 2, 32) == (9, 10.0)
    assert streams.overload_layout(2.0, 3.0, 10.0, 4, 32) == (4, 10.0)  # never fewer than the streams phase
    assert streams.overload_layout(100.0, 3.0, 10.0, 2, 4) == (4, 75.0)  # capped streams: a higher fps each


def test_stream_phase_totals_fairness_cpu_and_reads():
    records = [record("a", 10.0, 10.0, lambda t: 100.0, dropped=20, reads=(1, 1, 2)),
               record("b", 5.0, 10.0, lambda t: 200.0, dropped=0, reads=(1,)),
               record("c", 0.0, 10.0, lambda t: 0.0, refused="refused: full")]
    phase = streams.stream_phase(records, seconds=10.0, fps=10.0, resources=resources(cpu_s=7.5, wall_s=10.0))
    assert phase["processed"] == 150 and phase["processed_fps"] == 15.0
    assert phase["sent"] == 170 and phase["dropped"] == 20 and phase["dropped_share"] == round(20 / 170, 4)
    assert phase["refused"] == 1
    assert phase["fairness_min_max"] == 0.5  # the refused stream is not in it
    assert phase["cpu_ms_per_frame"] == 50.0 and phase["fps_per_core"] == 20.0
    assert phase["reads_per_track_median"] == 1 and phase["tracks"] == 4
    assert phase["server_p95_ms"] == 200.0 and phase["roundtrip_p95_ms"] == 210.0
    assert phase["worst_share_deviation"] == pytest.approx(1 / 3, abs=1e-3)  # 10 and 5 fps against 7.5
    assert phase["reads_per_text_track_median"] == 1 and phase["text_tracks"] == 4


def test_fair_share_is_capped_at_the_fps_the_server_granted():
    records = [record(f"s{k}", 15.0, 10.0, lambda t: 100.0, dropped=40) for k in range(2)]
    for r in records:
        r["granted_fps"] = 15.0  # asked for 19, the server's max_fps is 15
    phase = streams.stream_phase(records, seconds=10.0, fps=19.0, resources=None)
    assert phase["stream_fps_cap"] == 15.0 and phase["fair_share_fps"] == 15.0
    assert phase["worst_share_deviation"] == 0.0 and phase["cpu_ms_per_frame"] is None


def _image(fps: float, cores: float, p95: float = 300.0) -> dict:
    load = {"level": 2, "duration_s": 10.0, "ok": int(fps * 10), "errors": 0, "degraded": 0,
            "throughput_rps": fps, "goodput_rps": fps, "p50_ms": 120.0, "p95_ms": p95}
    return streams.image_phase(load, resources(cpu_s=cores * 10.0, wall_s=10.0))


def _phases(*, stream_p95: float, overload_growth: float, unfair: bool):
    good = streams.stream_phase([record(f"s{k}", 10.0, 10.0, lambda t: stream_p95) for k in range(2)],
                                10.0, 10.0, resources(cpu_s=5.0, wall_s=10.0))  # 20 fps on 0.5 cores
    overload = streams.stream_phase(
        [record(f"o{k}", 3.0 if unfair and k == 0 else 5.0, 30.0,
                lambda t: 200.0 * (overload_growth if t >= 20.0 else 1.0), dropped=150) for k in range(6)],
        30.0, 10.0, resources(cpu_s=45.0, wall_s=30.0))
    return good, overload


def test_summary_meets_every_target():
    good, overload = _phases(stream_p95=150.0, overload_growth=1.0, unfair=False)
    image = _image(fps=10.0, cores=1.0)  # 10 frames/s per core against the streams' 40
    summary = streams.summarize(good, image, overload, {"fps": 25.0, "from": "test"})
    assert summary["per_core_ratio"] == 4.0
    assert summary["throughput_ratio"] == 2.0
    assert summary["per_core_ratio_saturated"] == 2.0  # 30 fps on 1.5 cores against 10 on 1
    assert summary["streams_below_capacity"] is True
    assert {k: t["met"] for k, t in summary["targets"].items()} == {k: True for k in streams.STREAM_TARGETS}


def test_summary_misses_targets():
    slow, overload = _phases(stream_p95=400.0, overload_growth=3.0, unfair=True)
    image = _image(fps=30.0, cores=1.0)  # the per-image API as efficient as the streams: ratio 40 / 30
    summary = streams.summarize(slow, image, overload, {"fps": 30.0, "from": "test"})
    met = {k: t["met"] for k, t in summary["targets"].items()}
    assert met == {"per_core_ratio": False, "streams_p95_ms": False, "overload_p95_ms": False,
                   "overload_p95_growth": False, "overload_fair_share_deviation": False}
    assert summary["overload_p95_growth"] == 3.0 and summary["overload_p95_ms"] == 600.0
    lines = streams.target_lines(summary)
    assert len(lines) == len(streams.STREAM_TARGETS) and all("NOT MET" in line for line in lines)


def test_summary_without_overload_says_not_measured():
    good, _ = _phases(stream_p95=150.0, overload_growth=1.0, unfair=False)
    summary = streams.summarize(good, _image(10.0, 1.0), None, {"fps": None, "from": "test"})
    assert summary["targets"]["overload_p95_ms"]["met"] is None
    assert summary["streams_below_capacity"] is None
    assert any("not measured" in line for line in streams.target_lines(summary))


def _result(tmp_path) -> dict:
    good, overload = _phases(stream_p95=150.0, overload_growth=3.0, unfair=False)
    image = _image(10.0, 1.0)
    return {"mode": "streams", "date": "2026-12-07T00:00:00+00:00",
            "machine": {"cpus": 2, "python": "3.11", "platform": "linux"},
            "plan": {"streams": 2, "fps": 10.0, "seconds": 10.0, "clips": 2, "clip_frames": 60},
            "streams": good, "image": image, "overload": overload,
            "summary": streams.summarize(good, image, overload, {"fps": 20.0, "from": "test"}),
            "server": "http://127.0.0.1:8000", "started_server": False, "server_pid": 1, "elapsed_s": 50.0}


def test_report_renders_and_writes(tmp_path):
    result = _result(tmp_path)
    text = streams.markdown(result)
    assert "| per_core_ratio (" in text and "| overload_p95_growth (" in text
    assert "**no**" in text  # the growing overload latency
    assert "| o5 |" in text and "| per-image |" in text
    assert "| 0–3 |" in text  # the overload's windows (30 s in 3 s windows)
    paths = streams.write_report(result, tmp_path / "bench")
    assert sorted(p.name for p in paths.values()) == ["streams.json", "streams.md"]
    assert json.loads(paths["json"].read_text())["summary"]["per_core_ratio"] == result["summary"]["per_core_ratio"]
    assert not (tmp_path / "bench" / "latest.json").exists()  # the main bench's headline is left alone


# -- the CLI ---------------------------------------------------------------------------------------------


def test_bench_streams_option_dispatches(monkeypatch, tmp_path, capsys):
    parser = streams.add_arguments(argparse.ArgumentParser())
    options = parser.parse_args(["--streams", "4", "--stream-fps", "10", "--server", "http://127.0.0.1:8000",
                                 "--out", str(tmp_path)])
    assert (options.streams, options.stream_fps, options.stream_seconds, options.stream_overload_seconds) == \
        (4, 10.0, 30.0, 120.0)
    result = _result(tmp_path)
    monkeypatch.setattr(streams, "run_streams", lambda opts: result)
    assert streams.cmd_bench(options) == 0
    out = capsys.readouterr().out
    assert "overload_p95_growth" in out and "NOT MET" in out and "per_core_ratio" in out
    assert json.loads(out.strip().splitlines()[-1])["targets_met"]["overload_p95_growth"] is False

    bad = parser.parse_args(["--streams", "0", "--server", "http://x"])
    assert streams.cmd_bench(bad) == 1
