"""The disruptions ``festival-serve load`` makes on a local cluster (``festival-serve cluster local up``), at
planned seconds of the run: kill a worker node or a replica (SIGKILL: a crash, not a shutdown), or redeploy
the cluster's config with one ``user_config`` or ``args`` value changed (a rolling update). Each leaves an
event (when, what, what it hit or changed); ``festival_serve.measure.load`` measures from the run's
per-second rows what each did to the answers and how long goodput took to recover.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from festival_serve.pipeline.settings import SignDetectorSettings

#: Disruptions that kill what the local cluster started, and those that redeploy it with a changed config.
KILLS = ("node", "replica")
UPDATES = ("user_config", "args")


@dataclass(frozen=True)
class Fault:
    """A planned disruption: a crash (``KILLS``) or a redeploy with one value changed (``UPDATES``)."""

    at_s: float  # seconds into the run
    kind: str  # "node": every process of the worker node with the most GPU replicas; "replica": one replica;
    # "user_config" / "args": ``updated_config``'s change, deployed as ``serve deploy`` would
    deployment: str = "SignDetector"  # the replica fault's deployment


def updated_config(config: dict, kind: str) -> tuple[dict, str]:
    """``config`` with one value changed for a rolling-update test, and the change in words. ``user_config``: the
    detector's batch wait doubles (Serve reconfigures the running replicas in place); ``args``: the detector's
    confidence threshold rises by 0.01 (new replicas of every deployment whose arguments changed)."""
    config = copy.deepcopy(config)
    app = config["applications"][0]
    if kind == "user_config":
        detector = next(d for d in app["deployments"] if d["name"] == "SignDetector")
        old = detector["user_config"]["batch_wait_timeout_s"]
        detector["user_config"]["batch_wait_timeout_s"] = new = round(old * 2, 6)
        return config, f"SignDetector user_config.batch_wait_timeout_s {old:g} -> {new:g} s"
    if kind == "args":
        settings = app["args"].setdefault("sign_detector", {})
        old = settings.get("confidence", SignDetectorSettings().confidence)
        settings["confidence"] = new = round(old + 0.01, 4)
        return config, f"args.sign_detector.confidence {old:g} -> {new:g}"
    raise ValueError(f"unknown update {kind!r}; choose one of {', '.join(UPDATES)}")


class FaultInjector:
    """Carries out the planned disruptions at their seconds: kills what ``cluster local up`` started (SIGKILL: a
    crash, not a shutdown), or redeploys the cluster's config with one value changed and times the rollout.
    Runs in a thread of this process, using the Ray connection that ``load``'s replica sampler holds."""

    def __init__(self, faults: list[Fault], state_file: Path, start_at: float, *, rollout_timeout_s: float = 300) -> None:
        self.faults, self.start_at = sorted(faults, key=lambda f: f.at_s), start_at
        self.state_file = state_file.expanduser()
        self.state = json.loads(self.state_file.read_text())
        self.rollout_timeout_s = rollout_timeout_s
        self.events: list[dict] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="faults")

    def start(self) -> "FaultInjector":
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(self.rollout_timeout_s)

    def _run(self) -> None:
        for fault in self.faults:
            time.sleep(max(0.0, self.start_at + fault.at_s - time.time()))
            act = {"node": self._kill_node, "replica": self._kill_replica}.get(fault.kind, self._update)
            event = {"t": round(time.time() - self.start_at, 2), "kind": fault.kind}
            try:
                event.update(act(fault))
            except Exception as e:  # noqa: BLE001 - a disruption that could not be made is reported, not fatal
                event["error"] = f"{type(e).__name__}: {e}"
            self.events.append(event)
            print(f"  {'UPDATE' if fault.kind in UPDATES else 'FAULT'} at t={event['t']:.0f} s: {event}", flush=True)

    def _kill_node(self, fault: Fault) -> dict:
        from festival_serve.ops.local_cluster import placements, recorded_process

        replicas = [r for r in placements() if r.node_id != self.state["head"]]
        by_node: dict[str, float] = {}
        for r in replicas:
            by_node[r.node_id] = by_node.get(r.node_id, 0.0) + r.gpu
        node = max(by_node, key=by_node.get)
        lost = sorted(r.deployment for r in replicas if r.node_id == node)
        # The node's own processes only while they are the ones the state file recorded (a pid may be reused).
        recorded = [pid for pid in self.state["nodes"].get(node, []) if recorded_process(self.state, pid) is not None]
        pids = [r.pid for r in replicas if r.node_id == node] + recorded
        _kill(pids)
        return {"node": node[:8], "replicas_lost": lost, "pids_killed": len(pids)}

    def _kill_replica(self, fault: Fault) -> dict:
        from festival_serve.ops.local_cluster import placements

        replica = next(r for r in placements() if r.deployment == fault.deployment)
        _kill([replica.pid])
        return {"deployment": fault.deployment, "node": replica.node_id[:8], "pid": replica.pid}

    def _update(self, fault: Fault) -> dict:
        from festival_serve.ops.up import wait_until_running
        from festival_serve.ops.local_cluster import redeploy

        config, change = updated_config(self.state["deployed"], fault.kind)
        started = time.monotonic()
        redeploy(config)
        time.sleep(1.0)  # the controller marks the application DEPLOYING before the first poll
        wait_until_running(self.rollout_timeout_s, progress=lambda line: None)
        self.state["deployed"] = config  # what the cluster runs now, for `cluster local deploy` and the next run
        self.state_file.write_text(json.dumps(self.state, indent=2))
        return {"change": change, "rollout_s": round(time.monotonic() - started, 1)}


def _kill(pids: list[int]) -> None:
    import psutil

    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
