"""``festival-serve check-gpu``: where the models really run, and whether they share the GPU sanely.

Two sources, read side by side:

- NVML on this machine (``festival_serve.runtime.nvml.local_gpus``): driver and CUDA driver versions,
  and per device its name, memory (total/used/free, bytes), utilisation and the processes holding
  memory on it.
- ``GET /v1/models`` of a running graph: per stage and per network the device it resolved, the
  device its runtime reports (``runtime_device``), precision, backend and ONNX Runtime providers,
  threads, the GPU memory cap and use, and the Ray GPU share (``gpu_fraction``). Every field but
  ``name`` is read with ``.get``: entries from older replicas, or from a replica the ingress could
  not reach (``{"ready": false, "error": …}``), lack most of them.

The warnings are pure functions of those entries and the local devices, tested on hand-made dicts.
No Ray import: the command must work while the graph is down, and fast.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import logging
import sys
from typing import Any
from urllib.parse import urlsplit

from festival_serve.runtime.nvml import NO_GPU, local_gpus

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
#: Fractions like 0.2 + 0.2 + 0.3 + 0.3 sum to 1.0000000000000002 in floating point; Ray itself
#: rounds GPU shares to 1e-4, so anything within that of 1.0 fits on one GPU.
FRACTION_SLACK = 1e-4
GIB = 1 << 30


# -- the running graph ------------------------------------------------------------------------------

class GraphUnreachable(RuntimeError):
    """``/v1/models`` gave no list of models (nothing listening, an error status, not our API)."""


def fetch_models(url: str, timeout: float) -> list[dict[str, Any]]:
    import httpx

    endpoint = f"{url.rstrip('/')}/v1/models"
    try:
        reply = httpx.get(endpoint, timeout=timeout)
        reply.raise_for_status()
        return reply.json()["models"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise GraphUnreachable(f"no graph answered at {endpoint} ({type(e).__name__}: {e})") from e


def serves_this_machine(url: str) -> bool:
    """Whether ``url`` is this machine, so that its GPUs are the replicas' GPUs (a graph elsewhere
    says nothing about ours: only ``gpu_visible``/``gpu_fraction`` from the replica count there)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def network_row(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "backend", "device", "runtime_device", "precision", "providers", "threads")
    return {key: entry.get(key) for key in keys}


def stage_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The GPU-relevant facts of one ``/v1/models`` entry, with where it runs worked out."""
    keys = ("name", "deployment", "ready", "unavailable_reason", "error", "backend", "device", "runtime_device",
            "precision", "threads", "gpu_fraction", "gpu_visible", "gpu_memory_cap_bytes", "gpu_memory_used_bytes")
    row = {key: entry.get(key) for key in keys}
    row["networks"] = [network_row(n) for n in entry.get("networks") or []]
    row["runs_on"] = runs_on(entry)
    row["on_gpu"] = on_gpu(entry)
    return row


def _is_cuda(device: str | None) -> bool:
    return bool(device) and device.startswith("cuda")


def _where(part: dict[str, Any]) -> str | None:
    """The device a stage or network really runs on: the runtime's answer, else the resolved one."""
    return part.get("runtime_device") or part.get("device")


def _parts(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """What runs a model: the stage's networks, or the stage itself when it lists none; nothing
    for a stage that serves no model (missing weights, or a replica that did not answer)."""
    if not entry.get("ready"):
        return []
    return [p for p in entry.get("networks") or [entry] if _where(p)]


def runs_on(entry: dict[str, Any]) -> dict[str, str]:
    """``{network or stage name: device}``; empty for a stage that serves no model."""
    return {p.get("name") or entry["name"]: _where(p) for p in _parts(entry)}


def on_gpu(entry: dict[str, Any]) -> bool:
    devices = runs_on(entry).values()
    return bool(devices) and all(_is_cuda(d) for d in devices)


# -- warnings (pure) --------------------------------------------------------------------------------

def gpu_warnings(stages: list[dict[str, Any]], devices: list[dict[str, Any]], *, host_has_gpu: bool) -> list[str]:
    """Every warning for the ``/v1/models`` entries ``stages``; ``devices`` are this machine's NVML
    devices when the graph runs here (else empty), ``host_has_gpu`` whether the graph's host has one."""
    return [*fraction_warnings(stages), *memory_cap_warnings(stages, devices),
            *cpu_beside_gpu_warnings(stages, host_has_gpu=host_has_gpu)]


def _gpu_of(entry: dict[str, Any]) -> str:
    """The GPU a stage's share sits on. Ray hands a fractional replica exactly one GPU through
    CUDA_VISIBLE_DEVICES, so inside it that GPU is cuda:0 — also for a replica that holds a share
    but runs on the CPU (the share is reserved all the same)."""
    cuda = [d for d in runs_on(entry).values() if _is_cuda(d)] or [entry.get("device") or ""]
    device = cuda[0] if _is_cuda(cuda[0]) else "cuda:0"
    return "cuda:0" if device == "cuda" else device


def fraction_warnings(stages: list[dict[str, Any]]) -> list[str]:
    """GPU shares that add up to more than one device. One replica per stage answers
    ``/v1/models``, so this counts one replica each: more replicas only make it worse."""
    shares: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for entry in stages:
        if entry.get("gpu_fraction"):
            shares[_gpu_of(entry)][entry["name"]] = float(entry["gpu_fraction"])
    return [
        f"GPU shares on {device} add up to {sum(by_stage.values()):.2f} > 1.0 "
        f"({', '.join(f'{name} {share:g}' for name, share in by_stage.items())}): one GPU cannot hold them; "
        "Ray leaves a replica pending unless the node has another GPU for it"
        for device, by_stage in shares.items() if sum(by_stage.values()) > 1.0 + FRACTION_SLACK
    ]


def memory_cap_warnings(stages: list[dict[str, Any]], devices: list[dict[str, Any]]) -> list[str]:
    """Memory caps of the stages on one GPU that add up to more than that GPU's memory.

    A replica's ``cuda:N`` is matched to NVML's index N. Under Ray both are 0 on a one-GPU node; on a
    multi-GPU node the replica's cuda:0 may be another NVML index, but nodes are usually uniform, so
    the total compared against is still right."""
    totals = {d["index"]: d.get("memory_total_bytes") for d in devices}
    caps: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for entry in stages:
        if entry.get("gpu_memory_cap_bytes") and on_gpu(entry):
            caps[_gpu_of(entry)][entry["name"]] = int(entry["gpu_memory_cap_bytes"])
    warnings = []
    for device, by_stage in caps.items():
        total = totals.get(int(device.partition(":")[2] or 0))
        if total and sum(by_stage.values()) > total:
            listed = ", ".join(f"{name} {_gib(cap)}" for name, cap in by_stage.items())
            warnings.append(f"GPU memory caps on {device} add up to {_gib(sum(by_stage.values()))}, "
                            f"more than its {_gib(total)} ({listed})")
    return warnings


def cpu_beside_gpu_warnings(stages: list[dict[str, Any]], *, host_has_gpu: bool) -> list[str]:
    """Networks that run on the CPU although a GPU is there for them: the slow path nobody chose."""
    warnings = []
    for entry in stages:
        for part in _parts(entry):
            reason = None if _is_cuda(_where(part)) else _gpu_evidence(entry, part, host_has_gpu=host_has_gpu)
            if reason:
                name = entry["name"] if part is entry else part.get("name") or "?"
                label = entry["name"] if name == entry["name"] else f"{entry['name']}/{name}"
                warnings.append(f"{label} runs on {_where(part)} although {reason}")
    return warnings


def _gpu_evidence(entry: dict[str, Any], part: dict[str, Any], *, host_has_gpu: bool) -> str | None:
    """Why a GPU was there for this network of this stage, most specific first; None when none was."""
    if _is_cuda(part.get("device")):
        return f"it resolved {part['device']}: the runtime fell back"
    if any(_is_cuda(d) for d in runs_on(entry).values()):
        return "the stage's other networks run on the GPU"
    if entry.get("gpu_fraction"):
        return f"the replica holds a GPU share ({entry['gpu_fraction']:g})"
    if entry.get("gpu_visible"):
        return "the replica sees a GPU"
    return "this machine has a GPU" if host_has_gpu else None


def require_gpu_failures(report: dict[str, Any]) -> list[str]:
    """Why ``--require-gpu`` fails: no GPU anywhere, no graph to check, or a stage off the GPU."""
    stages = report["graph"]["stages"]
    failures = []
    if not report["local"]["available"] and not any(s["on_gpu"] for s in stages):
        failures.append(NO_GPU)
    if not report["graph"]["reachable"]:
        failures.append(f"no graph to check at {report['url']}")
    for stage in stages:
        if not stage["on_gpu"]:
            where = ", ".join(f"{k} on {v}" for k, v in stage["runs_on"].items()) or "serves no model"
            failures.append(f"{stage['name']} is not on a GPU ({where})")
    return failures


# -- the command ------------------------------------------------------------------------------------

def check(url: str, timeout: float) -> dict[str, Any]:
    """The whole report: local devices, the graph's stages, warnings (JSON-serialisable)."""
    local = local_gpus()
    try:
        entries, graph_error = fetch_models(url, timeout), None
    except GraphUnreachable as e:
        logger.debug("%s", e)
        entries, graph_error = [], str(e)
    here = serves_this_machine(url)
    warnings = gpu_warnings(entries, local["devices"] if here else [], host_has_gpu=here and local["available"])
    stages = [stage_row(e) for e in entries]
    report = {"url": url, "local": local, "warnings": warnings,
              "graph": {"reachable": graph_error is None, "error": graph_error, "stages": stages}}
    report["gpu"] = local["available"] or any(s["on_gpu"] for s in stages)
    return report


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _local_lines(local: dict[str, Any]) -> list[str]:
    if not local["available"]:
        return [f"local: {local['reason']} (NVML: {local['nvml_error']})"]
    lines = [f"local: NVIDIA driver {local['driver_version']}, CUDA driver {local['cuda_driver_version']}"]
    for d in local["devices"]:
        util = "?" if d["utilization_percent"] is None else f"{d['utilization_percent']}%"
        lines.append(f"  gpu {d['index']}  {d['name']}  memory {_gib(d['memory_used_bytes'])} used of "
                     f"{_gib(d['memory_total_bytes'])} ({_gib(d['memory_free_bytes'])} free)  utilisation {util}")
        lines += [f"    pid {p['pid']}  {p['name'] or '?'}  {_gib(p['used_memory_bytes'])}" for p in d["processes"]]
    return lines


def _runtime_text(part: dict[str, Any]) -> str:
    """Backend [providers], real device (resolved one when it differs), precision, threads."""
    providers = f" [{', '.join(part['providers'])}]" if part.get("providers") else ""
    where = _where(part) or "?"
    if part.get("device") and part.get("runtime_device") and part["device"] != part["runtime_device"]:
        where += f" (resolved {part['device']})"
    return (f"{part.get('backend') or '?'}{providers}  on {where}  {part.get('precision') or '?'}  "
            f"threads {part.get('threads') if part.get('threads') is not None else '?'}")


def _stage_lines(stage: dict[str, Any]) -> list[str]:
    head = f"  {stage['name']} ({stage['deployment'] or '?'})"
    if stage["error"] or not stage["ready"]:
        return [f"{head}  NOT SERVING: {stage['error'] or stage['unavailable_reason'] or 'no reason given'}"]
    share = "none" if not stage["gpu_fraction"] else f"{stage['gpu_fraction']:g}"
    memory = f"cap {_gib(stage['gpu_memory_cap_bytes'])}, used {_gib(stage['gpu_memory_used_bytes'])}"
    if not stage["networks"]:
        return [f"{head}  {_runtime_text(stage)}  gpu share {share}  gpu memory {memory}"]
    return [f"{head}  gpu share {share}  gpu memory {memory}",
            *(f"    {n['name'] or '?'}: {_runtime_text(n)}" for n in stage["networks"])]


def report_lines(report: dict[str, Any]) -> list[str]:
    lines = _local_lines(report["local"])
    graph = report["graph"]
    if not graph["reachable"]:
        lines.append(f"graph {report['url']}: not reachable — {graph['error']}; start it with `festival-serve up`")
    else:
        lines.append(f"graph {report['url']}:")
        lines += [line for stage in graph["stages"] for line in _stage_lines(stage)]
    lines += [f"warning: {w}" for w in report["warnings"]]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", default=DEFAULT_URL, help="the running graph (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=15, help="seconds to wait for /v1/models")
    parser.add_argument("--require-gpu", action="store_true",
                        help="exit 1 unless there is a GPU and every stage runs on one")
    parser.add_argument("--json", action="store_true",
                        help="the whole report as one JSON line, the last of stdout (the text goes to stderr)")
    return parser


def cmd_check_gpu(args: argparse.Namespace) -> int:
    report = check(args.url, args.timeout)
    report["require_gpu_failures"] = require_gpu_failures(report) if args.require_gpu else []
    # As in `eval`: with --json, stdout carries only the report, for scripts to parse.
    text = sys.stderr if args.json else sys.stdout
    for line in report_lines(report) + [f"required GPU: {f}" for f in report["require_gpu_failures"]]:
        print(line, file=text)
    if args.json:
        print(json.dumps(report, ensure_ascii=False), flush=True)
    return 1 if report["require_gpu_failures"] else 0
