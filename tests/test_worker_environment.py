"""One environment for the driver and its workers: a driver started by `uv run` hands its Serve replicas its own
interpreter. Ray's uv integration would otherwise run every worker as the driver's `uv run …` line in a copy of
the working directory, where uv builds a second environment with only the extras typed on that line.

Checked on ``cluster local up``'s path (``start_nodes``, then ``up.start(address=…)``: the one that regressed),
in a fresh interpreter (Ray reads its uv switch once, at import) under a stand-in `uv run` ancestor: a process
whose command line is ``…/uv run …``, which is all Ray looks for. ``festival-serve up`` (``up.start`` alone) sets
the same switch in the same place; a second Ray start here would double the test's ~40 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

#: A one-replica Serve app that reports the interpreter it runs on and whether ONNX Runtime is importable there.
PROBE_APP = '''
import importlib.util
import sys

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Probe:
    def __call__(self) -> dict:
        return {"executable": sys.executable, "onnxruntime": importlib.util.find_spec("onnxruntime") is not None}


app = Probe.bind()
'''

#: The driver: the probe deployed as ``cluster local up`` deploys the graph, its answer printed after ``PROBE``
#: (Ray's worker logs share the driver's stdout).
DRIVER = '''
import json

from festival_serve.ops import local_cluster, up

config = {"proxy_location": "Disabled", "applications": [{"name": "probe", "import_path": "probe:app"}]}
cluster = local_cluster.start_nodes(local_cluster.ClusterShape(workers=1, gpus_per_node=0, cpus_per_node=1,
                                                               head_cpus=1, object_store_mb=128))
try:
    up.start(config, offline=True, address=cluster.address)
    up.wait_until_running(90, progress=lambda line: None)
    from ray import serve

    print("PROBE", json.dumps(serve.get_app_handle("probe").remote().result(timeout_s=60)), flush=True)
finally:
    up.stop()
    cluster.shutdown()
'''

#: Stands in for `uv run`: runs the rest of its command line as a child and waits for it.
UV_RUN = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"


def test_replicas_of_a_uv_run_driver_run_its_interpreter(tmp_path: Path):
    (tmp_path / "probe.py").write_text(PROBE_APP)
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "run").write_text(UV_RUN)  # `uv run …` below: the interpreter named uv runs the file `run`
    (tmp_path / "uv").symlink_to(os.path.realpath(sys.executable))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}  # Ray's default: on
    with subprocess.Popen([str(tmp_path / "uv"), "run", sys.executable, "driver.py"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as driver:
        try:
            out, err = driver.communicate(timeout=150)  # ~40 s here; workers that cannot start hang Serve's start
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            out, err = driver.communicate()
    assert driver.returncode == 0, err[-3000:]
    report = json.loads(next(line for line in out.splitlines() if line.startswith("PROBE "))[6:])
    assert report == {"executable": sys.executable, "onnxruntime": True}  # the driver's environment, extras and all
