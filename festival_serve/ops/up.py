"""Deploy ``serve_config.yaml`` on a local Ray without a dashboard: what ``festival-serve up`` runs.

It goes through the same path as Ray's own ``serve run <config>`` (the config is validated by Ray's
``ServeDeploySchema`` and submitted with ``deploy_apps``), so what works here works with
``serve deploy`` on a cluster. The local profile only changes what a laptop cannot honour.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import os
import secrets
import socket
import time
from pathlib import Path

import yaml

from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import STAGE_NAMES

logger = logging.getLogger(__name__)


def load_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    return yaml.safe_load(path.read_text())


def pipeline_args(config: dict, model_store: str | None = None):
    """The application's typed ``args`` from a Serve config, ``model_store`` overridden when given."""
    args = dict(config["applications"][0].get("args") or {})
    if model_store:
        args["model_store"] = model_store
    return PipelineArgs.model_validate(args)


#: Niceness of the model replicas on a CPU-only machine (see BatchConfig.niceness). 19, not 10: since a batch runs
#: on every core (batch_slices), up to six model threads are runnable at once, and at 10 they took enough of the
#: cores from the proxy and the ingress that at 5x overload only 0.92 of refusals stayed fast (0.98 at 19, same
#: graph-only bench; closed-loop goodput level within the machine's drift: docs/PERFORMANCE.md).
LOCAL_MODEL_NICENESS = 19


def local_profile(config: dict, *, host: str, port: int, model_store: str | None, has_gpu: bool,
                  base_dir: Path, cpus: int | None = None, api_keys_file: str | None = None,
                  fake_gpus: bool = False, max_replicas: int | None = None) -> tuple[dict, list[str]]:
    """The config adapted to this machine, and one line per change made (printed to the user).
    ``api_keys_file`` (else the config's ``ingress.api_keys_file``): /v1 needs one of its keys.
    ``fake_gpus`` (no real GPU; ``festival_serve.ops.local_cluster``): keep every ``num_gpus`` so Ray schedules
    replicas by GPU share on nodes that advertise fake GPUs, and run every model on the CPU. ``max_replicas``:
    the replica cap (default ``max(1, cores // 4)``)."""
    config = copy.deepcopy(config)
    changes: list[str] = []
    config.setdefault("http_options", {}).update(host=host, port=port)
    for app in config["applications"]:
        args = app.setdefault("args", {})
        store = Path(model_store or args.get("model_store", "models")).expanduser()
        # Replicas do not share the CLI's working directory: hand them an absolute path.
        args["model_store"] = str(store if store.is_absolute() else (base_dir / store).resolve())
        changes.append(f"model store: {args['model_store']}")
        keys = api_keys_file or (args.get("ingress") or {}).get("api_keys_file")
        if keys:
            keys = Path(keys).expanduser()
            args["ingress"] = {**(args.get("ingress") or {}),
                               "api_keys_file": str(keys if keys.is_absolute() else (base_dir / keys).resolve())}
            changes.append(f"API keys: /v1 needs one of the keys in {args['ingress']['api_keys_file']}")
        if not has_gpu and fake_gpus:
            for section in STAGE_NAMES:
                args.setdefault(section, {})["device"] = "cpu"
            changes.append("FAKE GPUs: num_gpus kept, so Ray places every replica by its GPU share on the nodes' "
                           "fake GPUs; the models themselves run on the CPU (device: cpu)")
        elif not has_gpu:
            for deployment in app.get("deployments", []):
                options = deployment.get("ray_actor_options") or {}
                if options.get("num_gpus"):
                    options["num_gpus"] = 0
            changes.append("no GPU visible: num_gpus set to 0, models run on the CPU (ONNX Runtime)")
        if not has_gpu:
            # Four models share the cores: a runtime that spreads over all of them fights the others
            # (and Ray) for every core, so each gets half the cores. The describer too: the one trained here
            # (256-wide matmuls) generated a batch of 4 or 8 faster on 1 thread than on 2 (592 vs 670 ms and
            # 786 vs 995 ms, 2 cores), and the other core keeps serving the detectors meanwhile.
            cores = cpus or os.cpu_count() or 2
            # Replicas beyond what the cores can run add memory (a describer replica is ~2.5 GB), not
            # throughput: measured on 2 cores, autoscaling to 3 readers and 2 describers grew the graph
            # from ~5 to ~8 GB and split the describer's batches. Cap them by the cores there are.
            cap = max_replicas or max(1, cores // 4)
            capped = []
            for deployment in app.get("deployments", []):
                scaling = deployment.get("autoscaling_config")
                if scaling and scaling.get("max_replicas", 1) > cap:
                    scaling["max_replicas"] = cap
                    scaling["min_replicas"] = min(scaling.get("min_replicas", 1), cap)
                    capped.append(deployment["name"])
            if capped:
                changes.append(f"{cores} CPU cores: at most {cap} replica(s) each ({', '.join(capped)})"
                               if max_replicas is None else f"at most {cap} replica(s) each ({', '.join(capped)})")
            # Two requests in flight per model replica the ingress feeds: one running, the next queued behind it;
            # the frames' calls that arrive meanwhile wait in the ingress and travel together (festival_serve.serving.coalesce).
            # Measured on 2 cores, one replica each, 16 clients: 2 grouped ~3 calls a request against ~2 at 4.
            ingress = args.setdefault("ingress", {})
            if ingress.get("stage_requests_in_flight") is None:
                ingress["stage_requests_in_flight"] = 2 * cap
                changes.append(f"ingress: {2 * cap} request(s) in flight per stage (two per model replica)")
            # Models and the request path (proxy, ingress) share the cores: models yield to it, so a crowd beyond
            # capacity is still turned away in milliseconds (measured: without it, sheds took seconds at 5x).
            for deployment in app.get("deployments", []):
                if deployment.get("user_config") is not None:
                    deployment["user_config"].setdefault("niceness", LOCAL_MODEL_NICENESS)
            changes.append(f"model replicas at CPU niceness {LOCAL_MODEL_NICENESS}: the request path runs first")
            # Cores by need: each ONNX Runtime run takes `threads`, and a batch runs as up to cores / threads slices
            # at once, so the stage with the longest queue (the largest batches) spreads over every core while
            # the idle ones hold none (docs/DESIGN.md). The describer (torch generate) keeps its fixed threads.
            for section in STAGE_NAMES:
                settings = args.setdefault(section, {})
                if settings.get("threads") is None:
                    settings["threads"] = max(1, cores // 2)
                    changes.append(f"{section}: {settings['threads']} CPU thread(s)")
                if "batch_slices" in PipelineArgs.model_fields[section].annotation.model_fields \
                        and settings.get("batch_slices") is None:
                    settings["batch_slices"] = max(1, cores // settings["threads"])
                    changes.append(f"{section}: a batch runs as up to {settings['batch_slices']} slices at once")
    return config, changes


def prepare_models(config: dict, *, has_gpu: bool) -> None:
    """Export the detectors' ONNX files in a child process before the replicas start (see
    ``festival_serve.ops.export_onnx``: it keeps torch out of the ONNX Runtime replicas)."""
    import json
    import subprocess
    import sys
    import tempfile

    for app in config["applications"]:
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="festival-args-") as f:
            json.dump(app.get("args") or {}, f)
            f.flush()
            command = [sys.executable, "-m", "festival_serve.ops.export_onnx", "--args", f.name, *(["--gpu"] if has_gpu else [])]
            subprocess.run(command, check=False)


#: Ray settings for a one-machine run, set unless the environment already says otherwise (``apply_local_ray_env``).
#: Ray hands the driver's environment to every process it starts.
LOCAL_RAY_ENV = {
    # Workers run the driver's own interpreter, in the environment the driver was started in, extras and all. Under
    # `uv run`, Ray's uv integration (on by default) makes the driver's `uv run …` line every worker's py_executable,
    # run in a copy of the working directory: uv builds a second environment there from the lockfile with only the
    # extras typed on that line (`uv run --frozen festival-serve cluster local up` gave replicas without ONNX Runtime,
    # so every model stage failed to start). This is Ray's own switch for it; Ray reads it once, when imported.
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    # Ray gives a new HTTP proxy 5 s to answer its readiness check, three times, then kills it; a busy
    # 2-core machine (training, tests) can need longer just to start the proxy's worker process.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    # Ray starts every worker at niceness 15, so the proxy and the ingress would compete with the models as
    # equals; at 0 they run first and the model replicas yield (user_config.niceness), which keeps refusals
    # fast while the models are saturated.
    "RAY_worker_niceness": "0",
    # Serve's controller reconciles every 0.1 s by default: 0.08 of a core with the graph idle here (a quarter of
    # the graph's idle CPU). Every 0.5 s it takes 0.026; 16 clients got 17.4 req/s against 15.1 (medians, 2 cores).
    # Autoscaling still decides on its own delays (serve_config.yaml's upscale/downscale_delay_s).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Ray's "local Ray only" mode (ray._private.ray_constants.ENABLE_RAY_CLUSTER, read once, at import; the default
    # on macOS and Windows): a new node takes 127.0.0.1 as its address, and every process of the node then listens on
    # loopback only: the GCS, raylet, object manager and every worker's gRPC (they bind 127.0.0.1 when the node's
    # address is loopback, 0.0.0.0 otherwise), the dashboard, its agents and the metrics exporter
    # (dashboard/agent.py, dashboard/modules/reporter/reporter_agent.py), the runtime-env agent (it binds the node's
    # address). On Linux Ray otherwise gives the node this machine's address, and it turns an explicit 127.0.0.1
    # (`ray.init(_node_ip_address=)`, `ray start --node-ip-address`) back into that address
    # (services.resolve_ip_for_localhost). A node meant to be reachable is given its address (``node_address``).
    # Every process that connects to such a node needs it too: Ray would dial this machine's address instead.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray's token auth for every node started from here, not only those `ray.init` starts (it turns it on itself):
    # `cluster local`'s nodes (ray.cluster_utils) would run without it. It matters beyond loopback: each Serve
    # replica listens on every interface whatever the node's address (README "What listens where"), and checks the
    # token only in this mode. Ray reads it once, at import; the token file is ``private_ray_token``'s.
    "RAY_AUTH_MODE": "token",
}


def apply_local_ray_env() -> None:
    """Set ``LOCAL_RAY_ENV`` in this process where the environment does not already say otherwise, so every process
    Ray starts from here inherits it. Call it before Ray is imported: Ray reads its uv and local-only switches once,
    at import."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) reaches this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: ``--metrics-host`` values that mean every interface. Ray 2.60 serves its metrics on loopback when its node's address
#: is loopback and on every interface otherwise (reporter_agent.py: ``address=get_localhost_ip() if
#: is_localhost(self._ip) else ""``): no other address can be asked for.
EVERY_INTERFACE = ("0.0.0.0", "::")


def metrics_host_for(http_host: str, requested: str | None = None) -> str:
    """Where this node's Prometheus metrics listen: ``requested``, else loopback when the HTTP host (``--host``) is
    loopback and every interface otherwise. Ray binds its metrics exporter with its node: loopback metrics put every
    Ray port on loopback, metrics on every interface put every Ray port on this machine's address (``node_address``)."""
    host = requested or ("127.0.0.1" if is_loopback(http_host) else EVERY_INTERFACE[0])
    if not is_loopback(host) and host not in EVERY_INTERFACE:
        raise ValueError(f"metrics host {host}: Ray serves its metrics on loopback or on every interface only "
                         f"(127.0.0.1 or {EVERY_INTERFACE[0]})")
    return host


def node_address(metrics_host: str) -> str | None:
    """The address a new Ray node is given for metrics on ``metrics_host`` (``metrics_host_for``): none for loopback (in
    ``LOCAL_RAY_ENV``'s local-only mode Ray takes 127.0.0.1 itself, and refuses it when asked), else this machine's
    address as Ray would pick it (the one its default route leaves by). Call it with Ray imported, after
    ``apply_local_ray_env``."""
    import ray
    from ray._common.network_utils import node_ip_address_from_perspective

    if not is_loopback(metrics_host):
        return node_ip_address_from_perspective(None)
    if not is_loopback(ray.util.get_node_ip_address()):  # before ray.init: the address Ray would give a new node
        raise RuntimeError("Ray would put its node on this machine's address, every Ray port on every interface: "
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is set to 1, or Ray was imported before "
                           "apply_local_ray_env(). Unset it, or ask for metrics on every interface (--metrics-host "
                           f"{EVERY_INTERFACE[0]}) to expose the node on purpose")
    return None


def ray_token_path() -> Path | None:
    """The file Ray's token authentication reads, or None when it reads none (``RAY_AUTH_MODE`` other than token,
    or the token given in ``RAY_AUTH_TOKEN``). Ray's own order: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token`` (ray/_private/authentication/authentication_token_setup.py)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def private_ray_token(*, create: bool) -> Path | None:
    """Make Ray's token file owner-only (0600, in a 0700 folder when this makes it) and return its path. Ray writes
    a missing token with the default umask (0644 here: any local user could read it and run code on the node):
    ``create`` writes it first, as Ray would (256 random bits, hex), so Ray finds it and keeps it. One that is
    there already is tightened in place; with ``create`` false a missing one stays missing (joining a cluster:
    its token comes from whoever started it)."""
    path = ray_token_path()
    if path is None:
        return None
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    elif create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
    return path


def start(config: dict, *, offline: bool, dashboard: bool = False, num_cpus: int | None = None,
          metrics_port: int | None = None, metrics_host: str | None = None, address: str | None = None) -> None:
    """Start Ray and Serve on this machine and submit ``config`` (non-blocking).

    ``num_cpus`` overrides the CPU count Ray schedules with (default: the machine's cores). ``metrics_port``:
    where this node's Prometheus metrics are served (``/metrics``: Ray's, Serve's and ``festival_serve.serving.metrics``,
    every process of the node), default a free port Ray picks; ``metrics_host``: on which host (``metrics_host_for``: by
    default loopback when ``http_options.host`` is, and with it every Ray port). ``address``: join that running
    cluster instead (its nodes were started with their own settings; the four above do not apply)."""
    apply_local_ray_env()
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from festival_serve.runtime.offline import OFFLINE_ENV, apply_offline_env

    schema = ServeDeploySchema.model_validate(config)
    runtime_env: dict = {}
    if offline:
        apply_offline_env()
        runtime_env = {"env_vars": dict(OFFLINE_ENV),
                       "worker_process_setup_hook": "festival_serve.runtime.offline.install_network_guard"}
    node_options = {}
    if not address:
        metrics_host = metrics_host_for(config["http_options"]["host"], metrics_host)
        node_options = {"include_dashboard": dashboard, "num_cpus": num_cpus, "_metrics_export_port": metrics_port,
                        "_node_ip_address": node_address(metrics_host)}
    private_ray_token(create=not address)
    ray.init(address=address, namespace=SERVE_NAMESPACE, runtime_env=runtime_env, log_to_driver=True,
             logging_level=logging.WARNING, **node_options)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)


def port_in_use(port: int) -> bool:
    """Whether ``port`` is taken on any interface of this machine. When Ray's metrics agent cannot bind its port
    (on loopback or every interface, with its node), the node fails to start ~30 s later with a timeout that does
    not name the port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def metrics_port() -> int:
    """The port this (running) node serves its Prometheus metrics on."""
    import ray

    return int(ray.nodes()[0]["MetricsExportPort"])


def wait_until_running(timeout_s: float, progress=print) -> None:
    """Poll ``serve.status()`` until every application runs; fail with Ray's message if one cannot."""
    from ray import serve

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {name: app.status for name, app in apps.items()}
        if apps and all(s == "RUNNING" for s in states.values()):
            return
        for name, app in apps.items():
            if app.status == "DEPLOY_FAILED":
                details = "; ".join(f"{d}: {s.message}" for d, s in app.deployments.items() if s.message)
                raise RuntimeError(f"application {name!r} failed to deploy: {app.message or details}")
        line = ", ".join(
            f"{d}={getattr(s.status, 'value', s.status)}" for app in apps.values() for d, s in app.deployments.items()
        ) or "starting Serve"
        if line != last:
            progress(f"  … {line}")
            last = line
        time.sleep(1)
    raise TimeoutError(f"the graph did not start within {timeout_s:.0f} s")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
