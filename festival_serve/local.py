"""Deploy ``serve_config.yaml`` on a local Ray without a dashboard: what ``festival-serve up`` runs.

It goes through the same path as Ray's own ``serve run <config>`` (the config is validated by Ray's
``ServeDeploySchema`` and submitted with ``deploy_apps``), so what works here works with
``serve deploy`` on a cluster. The local profile only changes what a laptop cannot honour.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)


def load_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    return yaml.safe_load(path.read_text())


def local_profile(config: dict, *, host: str, port: int, model_store: str | None, has_gpu: bool,
                  base_dir: Path) -> tuple[dict, list[str]]:
    """The config adapted to this machine, and one line per change made (printed to the user)."""
    config = copy.deepcopy(config)
    changes: list[str] = []
    config.setdefault("http_options", {}).update(host=host, port=port)
    for app in config["applications"]:
        args = app.setdefault("args", {})
        store = Path(model_store or args.get("model_store", "models")).expanduser()
        # Replicas do not share the CLI's working directory: hand them an absolute path.
        args["model_store"] = str(store if store.is_absolute() else (base_dir / store).resolve())
        changes.append(f"model store: {args['model_store']}")
        if not has_gpu:
            for deployment in app.get("deployments", []):
                options = deployment.get("ray_actor_options") or {}
                if options.get("num_gpus"):
                    options["num_gpus"] = 0
            changes.append("no GPU visible: num_gpus set to 0, models run on the CPU (ONNX Runtime)")
    return config, changes


def start(config: dict, *, offline: bool, dashboard: bool = False, num_cpus: int | None = None) -> None:
    """Start Ray and Serve on this machine and submit ``config`` (non-blocking).

    ``num_cpus`` overrides the CPU count Ray schedules with (default: the machine's cores)."""
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from festival_serve.offline import OFFLINE_ENV, apply_offline_env

    schema = ServeDeploySchema.model_validate(config)
    runtime_env: dict = {}
    if offline:
        apply_offline_env()
        runtime_env = {"env_vars": dict(OFFLINE_ENV),
                       "worker_process_setup_hook": "festival_serve.offline.install_network_guard"}
    ray.init(namespace=SERVE_NAMESPACE, include_dashboard=dashboard, num_cpus=num_cpus,
             runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)


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
