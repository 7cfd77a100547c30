"""The bench's outputs: ``<mode>.json`` (everything), ``<mode>.md`` (tables), ``<mode>-latency.png``
(latency against throughput, every system), ``<mode>-goodput.png`` (goodput against clients per frame set),
``<mode>-micro.png`` (throughput against batch size per model) and ``latest.json`` (the headline numbers of
the last run, whatever its mode)."""

from __future__ import annotations

import json
from pathlib import Path

from festival_serve.measure.bench.targets import AT_MOST, FRAME_TAGS, TARGETS
from festival_serve.pipeline.stages import STAGE_NAMES

FRAME_LABELS = {"mixed": "mixed held-out scenes", "text_signs": "scenes with a text sign", "no_text": "scenes without"}


def write(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    mode = result["mode"]
    paths = {"json": out / f"{mode}.json", "markdown": out / f"{mode}.md", "latest": out / "latest.json"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    summary = result["summary"]
    latest = {"mode": mode, "date": result["date"], **{k: summary.get(k) for k in TARGETS},  # the headline first
              **{k: v for k, v in summary.items() if k not in TARGETS}, "report": paths["json"].name}
    paths["latest"].write_text(json.dumps(latest, indent=2) + "\n")
    plots = _plots(result, out)
    paths.update(plots)
    paths["markdown"].write_text(markdown(result, {k: v.name for k, v in plots.items()}))
    return paths


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict, plots: dict[str, str]) -> str:
    s = result["summary"]
    machine = result["machine"]
    lines = [
        f"# festival-serve bench ({result['mode']}), {result['date']}",
        "",
        f"Machine: {machine['cpus']} CPUs, CUDA {'yes' if machine['cuda'] else 'no'}, Python {machine['python']}, "
        + ", ".join(f"{k} {machine[k]}" for k in ("ray", "torch", "onnxruntime", "transformers") if k in machine)
        + f". Whole run: {result['elapsed_s']:.0f} s.",
        "",
        "Models: " + "; ".join(f"{m['stage']} = {m['kind']}" for m in result["models"])
        + f". A stand-in describer generates exactly {result['plan']['new_tokens']} new tokens per frame; trained "
          "weights generate until the description ends (the config's max_new_tokens at most). The microbenchmarks "
          "time the served describer and the SmolVLM-256M-shaped stand-in (the real model's cost).",
        "",
        "## Headline (the graph against the baseline and the LitServe peer, same run)",
        "",
        "| metric | value | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for key in TARGETS:
        met = s["targets_met"].get(key)
        op = "≤" if key in AT_MOST else "≥"
        spread = s.get(f"{key}_spread")
        shown = _fmt(s.get(key), 3) + (f" ({_fmt(spread[0], 3)} – {_fmt(spread[1], 3)})" if spread else "")
        lines.append(f"| {key} | {shown} | {op} {s['targets'].get(key)} | "
                     f"{'–' if met is None else ('yes' if met else '**no**')} |")
    rounds = result["plan"].get("rounds")
    if rounds:
        lines += ["", f"Ratios between systems are the median of {rounds} interleaved rounds (each headline point "
                      "measured on every system, one after another, the others frozen; each round in a rotated "
                      "order), with the rounds' min – max in brackets."]
    lines += ["", f"p50 at concurrency 1, describe=false: graph {_fmt(s['graph_p50_ms_c1'])} ms, baseline "
                  f"{_fmt(s['baseline_p50_ms_c1'])} ms. Peak goodput (answers without a degraded stage, per s): "
                  f"describe=false graph {_fmt(s['graph_peak_rps_nodescribe'], 2)} / baseline "
                  f"{_fmt(s['baseline_peak_rps_nodescribe'], 2)}; describe=true graph "
                  f"{_fmt(s['graph_peak_rps_describe'], 3)} / baseline {_fmt(s['baseline_peak_rps_describe'], 3)}. "
                  f"Graph memory: peak RSS sum {_fmt(s['graph_rss_gb'], 2)} GB (PSS at the end "
                  f"{_fmt(s['graph_pss_gb_at_end'], 2)} GB); baseline peak RSS {_fmt(s['baseline_rss_gb'], 2)} GB.", ""]
    if "latency" in plots:
        lines += [f"![latency against throughput]({plots['latency']})", ""]
    lines += _tuning_lines(result)
    lines += _peer_lines(result, plots)
    lines += _efficiency_lines(result)

    lines += _overload_lines(result, plots)
    lines += ["## Load points", "",
              "| system | describe | frames | load | goodput req/s | p50 ms | p95 ms | p99 ms | errors | degraded | "
              "CPU cores | CPU ms / answer | peak RSS GB | mean batch (signs / hazards / OCR crops / VLM) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, system in result["systems"].items():
        for p in system["points"]:
            load = f"{p['level']:g} clients" if p["mode"] == "closed" else f"{p['level']:g}/s open"
            batches = " / ".join(_fmt((p["batches"].get(stage) or {}).get("mean"), 2)
                                 for stage in STAGE_NAMES)
            lines.append(f"| {name} | {str(p['describe']).lower()} | {p.get('frames', 'mixed')} | {load} | "
                         f"{_fmt(p['goodput_rps'], 2)} | "
                         f"{_fmt(p['p50_ms'])} | {_fmt(p['p95_ms'])} | {_fmt(p['p99_ms'])} | {p['errors']} | "
                         f"{p['degraded']} | {_fmt(p['resources']['cpu_cores'], 2)} | {_fmt(p.get('cpu_ms_per_answer'))} | "
                         f"{_fmt(p['resources']['peak_rss_gb'], 2)} | {batches} |")
    lines += ["", "## Processes (peak RSS over the whole load, CPU cores averaged over it)", "",
              "| system | process | count | peak RSS MB | CPU cores |", "| --- | --- | --- | --- | --- |"]
    for name, system in result["systems"].items():
        for label, row in system["processes"].items():
            lines.append(f"| {name} | {label} | {row['processes']} | {_fmt(row['peak_rss_mb'], 0)} | "
                         f"{_fmt(row['cpu_cores'], 2)} |")
    if result["micro"]:
        lines += ["", "## Per-model microbenchmarks (in-process, median of repeats)", ""]
        if "micro" in plots:
            lines += [f"![throughput against batch size]({plots['micro']})", ""]
        lines += ["| model | backend | device | precision | batch | ms / batch | items/s | new tokens/s | "
                  "served reader's speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["micro"]:
            speedup = f"{r['served_speedup']:.2f}x" if r.get("served_speedup") else ""
            lines.append(f"| {r['model']} | {r['backend']} | {r['device']} | {r['precision']} | {r['batch']} | "
                         f"{_fmt(r['ms_per_batch'])} | {_fmt(r['items_per_s'], 2)} {r['unit']} | "
                         f"{_fmt(r.get('tokens_per_s'))} | {speedup} |")
    return "\n".join(lines) + "\n"


def _tuning_lines(result: dict) -> list[str]:
    """What the peer and the baseline were tuned to, and every candidate's calibration goodput."""
    tuning = result.get("tuning") or {}
    if not tuning:
        return []
    lines = ["## The peer and the baseline, tuned", "",
             "Each candidate was started and loaded with the calibration (closed loop, mixed frames, describe=false); "
             "knobs one at a time, threads first. The kept setting is what the rest of the run measured.", "",
             "| system | threads | max batch | batch wait ms | calibration goodput req/s | kept |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in tuning.items():
        chosen = row["chosen"]
        for tried in row["tried"] or [{**chosen, "goodput_rps": None}]:
            kept = all(tried[k] == chosen[k] for k in chosen)
            batching = ("– | –" if name == "baseline"  # one request at a time: nothing to batch
                        else f"{tried['max_batch_size']} | {tried['batch_timeout_s'] * 1000:g}")
            lines.append(f"| {name} | {_fmt(tried['threads'])} | {batching} | {_fmt(tried['goodput_rps'], 2)} | "
                         f"{'**yes**' if kept else ''} |")
    return lines + [""]


def _efficiency_lines(result: dict) -> list[str]:
    """The models' own CPU per frame against each system's CPU per answer at 16 clients."""
    efficiency, s = result.get("efficiency") or {}, result["summary"]
    if not efficiency:
        return []
    lines = ["## Serving efficiency (the models' own CPU per frame / CPU per answer at the most clients)", "",
             "The models alone: in-process, every runtime on one thread, at their best batch, describe=false "
             "(`festival_serve/measure/bench/efficiency.py`).", "",
             "| frames | models alone, CPU ms / frame (batch) | graph CPU ms / answer | graph efficiency | "
             "peer CPU ms / answer | peer efficiency |", "| --- | --- | --- | --- | --- | --- |"]
    for frames, row in efficiency.items():
        spent = {n: (_closed_points(result["systems"].get(n, {}), frames) or [{}])[-1].get("cpu_ms_per_answer")
                 for n in ("graph", "peer")}  # at the most clients
        lines.append(f"| {FRAME_LABELS.get(frames, frames)} | {_fmt(row['ms_per_frame'])} ({row['batch']}) | "
                     f"{_fmt(spent['graph'])} | {_fmt(s.get('serving_efficiency' + FRAME_TAGS[frames]), 3)} | "
                     f"{_fmt(spent['peer'])} | {_fmt(s.get('peer_serving_efficiency' + FRAME_TAGS[frames]), 3)} |")
    return lines + [""]


def _closed_points(system: dict, frames: str) -> list[dict]:
    """describe=false closed-loop points of one frame set, by clients."""
    return sorted((p for p in system.get("points", []) if not p["describe"] and p["mode"] == "closed"
                   and p.get("frames", "mixed") == frames), key=lambda p: p["level"])


def _peer_lines(result: dict, plots: dict[str, str]) -> list[str]:
    """Per frame set and client count: goodput, p50 and CPU per answer of every system, and graph / peer."""
    systems = result["systems"]
    if "peer" not in systems:
        return []
    names = list(systems)
    lines = ["## Against the LitServe peer (describe=false, closed loop, same client and frames)", "",
             "A point measured in every round shows its median round (goodput, p50 and CPU from that one "
             "measurement) and each round's goodput; graph / peer is the ratio of those medians.", ""]
    if "goodput" in plots:
        lines += [f"![goodput against clients]({plots['goodput']})", ""]
    lines += ["| frames | clients | " + " | ".join(f"{n} req/s (p50 ms, CPU ms/answer)" for n in names)
              + " | graph / peer |", "| --- | --- | " + "--- | " * len(names) + "--- |"]
    for frames, label in FRAME_LABELS.items():
        by_system = {n: {p["level"]: p for p in _closed_points(systems[n], frames)} for n in names}
        for clients in sorted({c for points in by_system.values() for c in points}):
            cells = []
            for n in names:
                p = by_system[n].get(clients)
                repeats = p and p.get("round_goodput_rps") or []
                cells.append("–" if p is None else f"{_fmt(p['goodput_rps'], 2)} ({_fmt(p['p50_ms'])}, "
                                                   f"{_fmt(p.get('cpu_ms_per_answer'), 0)})"
                             + (f" rounds {', '.join(_fmt(v, 2) for v in repeats)}" if len(repeats) > 1 else ""))
            graph, peer = by_system.get("graph", {}).get(clients), by_system["peer"].get(clients)
            ratio = (f"{graph['goodput_rps'] / peer['goodput_rps']:.2f}x"
                     if graph and peer and peer["goodput_rps"] else "–")
            lines.append(f"| {label} | {clients:g} | " + " | ".join(cells) + f" | {ratio} |")
    return lines + [""]


def _goodput_plot(result: dict, out: Path, plt) -> Path | None:
    """Goodput against closed-loop clients (describe=false), one panel per frame set, a line per system."""
    systems = result["systems"]
    sets = [f for f in FRAME_LABELS if any(_closed_points(system, f) for system in systems.values())]
    if not sets:
        return None
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), squeeze=False)
    for ax, frames in zip(axes[0], sets):
        for name, system in systems.items():
            points = _closed_points(system, frames)
            if points:
                ax.plot([p["level"] for p in points], [p["goodput_rps"] for p in points], "o-", label=name)
        ax.set_title(FRAME_LABELS[frames])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients (closed loop)")
        ax.set_ylabel("goodput (answers/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{result['mode']}-goodput.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _overload_lines(result: dict, plots: dict[str, str]) -> list[str]:
    rows = [(name, row) for name, system in result["systems"].items() for row in system.get("overload", [])]
    if not rows:
        return []
    lines = ["## Overload (open loop at multiples of each system's own capacity, a budget per request)", ""]
    if "overload" in plots:
        lines += [f"![goodput and latency against offered load]({plots['overload']})", ""]
    lines += ["| system | load | offered req/s | budget s | goodput req/s | within budget + 0.25 s | answered | "
              "shed | shed fast + Retry-After | shed p50 ms | p50 ms | p99 ms | errors | hung |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['multiple']:g}x | {_fmt(r['rate'], 2)} | {r['budget_s']:g} | "
                     f"{_fmt(r['goodput_rps'], 2)} | {_fmt(r['within_budget'], 3)} | {r['answered']} | {r['shed']} | "
                     f"{_fmt(r['shed_fast'], 3)} | {_fmt(r['shed_p50_ms'])} | {_fmt(r['p50_ms'])} | "
                     f"{_fmt(r['p99_ms'])} | {r['errors']} | {r['hung']} |")
    return lines + [""]


def _overload_plot(result: dict, out: Path, plt) -> Path | None:
    systems = {name: system.get("overload", []) for name, system in result["systems"].items()}
    if not any(systems.values()):
        return None
    fig, (goodput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in systems.items():
        if not rows:
            continue
        offered = [r["rate"] for r in rows]
        goodput.plot(offered, [r["goodput_rps"] for r in rows], "o-", label=name)
        line = latency.plot(offered, [r["p50_ms"] for r in rows], "o-", label=f"{name} p50 (answers)")[0]
        latency.plot(offered, [r["p99_ms"] for r in rows], "s--", color=line.get_color(), alpha=0.6,
                     label=f"{name} p99 (answers)")
    budget_ms = rows[0]["budget_s"] * 1000
    latency.axhline(budget_ms, color="grey", linestyle=":", label="budget")
    for ax, title, ylabel in ((goodput, "goodput against offered load", "goodput (useful answers/s in budget)"),
                              (latency, "latency of answers against offered load", "latency (ms)")):
        ax.set_title(title)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    latency.set_yscale("log")
    fig.tight_layout()
    path = out / f"{result['mode']}-overload.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plots(result: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode, paths = result["mode"], {}
    systems = result["systems"]
    if systems:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, describe in zip(axes, (False, True)):
            for name, system in systems.items():
                pts = sorted((p for p in system["points"] if p["describe"] == describe and p["p50_ms"] is not None
                              and p.get("frames", "mixed") == "mixed"),
                             key=lambda p: p["goodput_rps"])
                if not pts:
                    continue
                x = [p["goodput_rps"] for p in pts]
                line = ax.plot(x, [p["p50_ms"] for p in pts], "o-", label=f"{name} p50")[0]
                ax.plot(x, [p["p95_ms"] for p in pts], "s--", color=line.get_color(), alpha=0.6, label=f"{name} p95")
            ax.set_title(f"describe={str(describe).lower()}")
            ax.set_xlabel("goodput (requests/s)")
            ax.set_ylabel("latency (ms)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"festival-serve bench ({mode}): " + " vs ".join(systems))
        fig.tight_layout()
        paths["latency"] = out / f"{mode}-latency.png"
        fig.savefig(paths["latency"], dpi=90)
        plt.close(fig)
        for key, plot in (("overload", _overload_plot), ("goodput", _goodput_plot)):
            path = plot(result, out, plt)
            if path is not None:
                paths[key] = path
    if result["micro"]:
        models = list(dict.fromkeys(r["model"] for r in result["micro"]))
        fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
        for ax, model in zip(axes[0], models):
            rows = [r for r in result["micro"] if r["model"] == model]
            for variant in dict.fromkeys((r["backend"], r["device"], r["precision"]) for r in rows):
                sel = [r for r in rows if (r["backend"], r["device"], r["precision"]) == variant]
                ax.plot([r["batch"] for r in sel], [r["items_per_s"] for r in sel], "o-", label="/".join(variant))
            ax.set_title(model)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(f"{rows[0]['unit']}/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths["micro"] = out / f"{mode}-micro.png"
        fig.savefig(paths["micro"], dpi=90)
        plt.close(fig)
    return paths
