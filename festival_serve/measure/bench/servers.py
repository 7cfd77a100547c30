"""The systems under test, each started as its own process tree on a local port:

- ``graph``: ``festival-serve up`` (local Ray + Serve, the local profile of serve_config.yaml);
- ``baseline``: ``python -m festival_serve.measure.baseline`` (one uvicorn worker, models in-process);
- ``peer``: ``python -m festival_serve.measure.bench.peer`` (LitServe, one inference worker batching every model).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from festival_serve.measure.procstats import tree
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import STAGE_NAMES


class ServerFailed(RuntimeError):
    """A system under test did not start or died; the message carries the tail of its log."""


class Server:
    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.command, self.port, self.log = name, command, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float, progress=print) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        progress(f"{self.name}: starting ({' '.join(self.command[1:4])} …), log {self.log}")
        started = time.monotonic()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    progress(f"{self.name}: ready in {time.monotonic() - started:.0f} s")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise ServerFailed(f"{self.name} was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def models(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/models", timeout=30).json()["models"]

    def stop(self, grace_s: float = 60) -> None:
        """SIGINT (the graph shuts Serve and Ray down cleanly), then kill whatever of the tree is left."""
        if self.process is None or self.process.poll() is not None:
            return
        procs = tree(self.process.pid)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def graph_server(config: dict, args: PipelineArgs, *, port: int, workdir: Path, env: dict[str, str]) -> Server:
    """``festival-serve up`` on ``config`` with its application args replaced by ``args``."""
    config = json.loads(json.dumps(config))  # deep copy
    config["applications"][0]["args"] = args.model_dump(mode="json")
    path = workdir / "graph_serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "festival_serve.cli", "up", "--config", str(path), "--no-dashboard",
               "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]  # 0: any free port, not 8080
    return Server("graph", command, port, workdir / "graph.log", env)


def baseline_server(args: PipelineArgs, *, port: int, workdir: Path) -> Server:
    return _server_on_args("baseline", "festival_serve.measure.baseline", args, port=port, workdir=workdir)


def peer_server(args: PipelineArgs, *, port: int, workdir: Path, max_batch_size: int | None = None,
                batch_timeout_s: float | None = None) -> Server:
    """The LitServe peer; ``max_batch_size`` and ``batch_timeout_s`` are LitServe's batching (None: the peer's
    defaults)."""
    batching = ([] if max_batch_size is None else ["--max-batch-size", str(max_batch_size)]) + \
               ([] if batch_timeout_s is None else ["--batch-timeout", str(batch_timeout_s)])
    return _server_on_args("peer", "festival_serve.measure.bench.peer", args, port=port, workdir=workdir,
                           extra=batching)


def with_threads(args: PipelineArgs, threads: int | None) -> PipelineArgs:
    """``args`` with every stage's runtime threads set to ``threads`` (None: each runtime's default)."""
    return args.model_copy(update={stage: getattr(args, stage).model_copy(update={"threads": threads})
                                   for stage in STAGE_NAMES})


def _server_on_args(name: str, module: str, args: PipelineArgs, *, port: int, workdir: Path,
                    extra: list[str] = ()) -> Server:
    """``python -m module --args ARGS.json``: a one-process server of the same models and settings."""
    path = workdir / f"{name}_args.json"
    path.write_text(args.model_dump_json(indent=2))
    command = [sys.executable, "-m", module, "--args", str(path), "--host", "127.0.0.1", "--port", str(port), *extra]
    return Server(name, command, port, workdir / f"{name}.log")
