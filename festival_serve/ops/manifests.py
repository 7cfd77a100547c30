"""Cluster manifests derived from ``serve_config.yaml``: the KubeRay ``RayService`` committed as
``cluster/rayservice.yaml``, and a copy of the Serve config whose model store is an absolute path
(what ``serve deploy`` needs on a Ray cluster launcher cluster).

``serve_config.yaml`` stays the single source of replicas, resources, autoscaling and batch sizes:
the RayService embeds it verbatim as ``serveConfigV2``, changing only ``args.model_store``.
No Ray import; this module only shapes dicts and YAML. Regenerate the committed manifest with::

    python -m festival_serve.ops.manifests render --config serve_config.yaml \\
        --image ghcr.io/your-org/festival-serve:0.1.0 --out cluster/rayservice.yaml

Every Ray pod whose node runs a Serve proxy also runs HAProxy as a sidecar (``festival_serve.ops.front_proxy``): it
takes port 8000 on the pod, Serve's proxy moves to the pod's loopback (``http_options``, the one other change to
the embedded config), and the Serve Service points at HAProxy. Its config, rendered from the same serve config,
rides in a ConfigMap in the same file; the operators' copy ``cluster/haproxy.cfg`` (+ ``cluster/haproxy-errors/``)
is rewritten with::

    python -m festival_serve.ops.manifests front-proxy --config serve_config.yaml --out-dir cluster

The resource numbers quoted in the hand-written ``cluster/ray-cluster.yaml`` and ``cluster/README.md``
live in generated regions between ``BEGIN GENERATED resources`` / ``END GENERATED resources`` markers;
rewrite them (or, with ``--check``, only compare them) with::

    python -m festival_serve.ops.manifests docs
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from festival_serve.ops import front_proxy
from festival_serve.pipeline.serve_config import check_serve_config

#: Stand-in for the image a user builds and pushes (see cluster/README.md); never pullable.
PLACEHOLDER_IMAGE = "ghcr.io/your-org/festival-serve:0.1.0"
#: Must equal the Ray inside the image: pyproject.toml pins ray[serve]==2.60.0.
RAY_VERSION = "2.60.0"
#: PersistentVolumeClaim holding the weights and the derived ONNX files / TensorRT engines.
MODEL_STORE_CLAIM = "festival-models"
MODEL_STORE_VOLUME = "model-store"
#: Two GPU workers always up: the safety stages' min_replicas of 2 (one per node, so a node loss leaves one)
#: do not fit one GPU beside the rest (the generated sizing in cluster/README.md says how many GPUs min_replicas
#: take), and a cold node takes minutes to boot and load the models.
DEFAULT_GPU_WORKERS_MIN = 2
#: Seconds the old RayCluster keeps serving after a blue/green upgrade switched traffic away: > the largest
#: request budget (30 s) plus the proxy's drain.
RAY_CLUSTER_DELETION_DELAY_S = 60
#: The one-GPU workers that every deployment at max_replicas needs when packed perfectly
#: (``resource_demand``; the number is in cluster/README.md's generated table), plus one for imperfect
#: packing and a rolling update. tests/test_cluster.py fails if it no longer covers the GPUs.
DEFAULT_GPU_WORKERS_MAX = 4
#: The front proxy's sidecar: the official HAProxy image from Docker Hub (docker.io/library/haproxy), the same
#: 2.6 LTS series as Debian's package that tests/test_front_proxy.py runs; pin its digest where images must not
#: move. It runs as the image's unprivileged user, so it listens on a port above 1024.
FRONT_PROXY_IMAGE = "haproxy:2.6"
FRONT_PROXY_CONTAINER = "front-proxy"
FRONT_PROXY_VOLUME = "front-proxy-config"
#: Where the official image looks for its config; the error files lie beside it (``default-path config``).
FRONT_PROXY_CONFIG_DIR = "/usr/local/etc/haproxy"
#: Pod annotation carrying the config's digest: a changed config changes the pod templates, so KubeRay rolls out
#: pods that load it (HAProxy reads its config once, at start; an updated ConfigMap alone reaches no process).
FRONT_PROXY_DIGEST_ANNOTATION = "festival-serve/front-proxy-config-sha256"


class GpuDemand(NamedTuple):
    """GPUs (Ray's logical units) asked for by the Serve config."""

    replica_set: float  # one replica of every deployment
    at_max_replicas: float  # every deployment at its autoscaling max_replicas
    largest_replica: float  # the biggest single num_gpus: must fit on one worker


def with_model_store(serve_config: dict, model_store: str) -> dict:
    """A copy of ``serve_config`` whose every application reads weights from ``model_store``."""
    config = copy.deepcopy(serve_config)
    for app in config["applications"]:
        app.setdefault("args", {})["model_store"] = model_store
    return config


def behind_front_proxy(serve_config: dict) -> dict:
    """A copy of ``serve_config`` whose Serve proxies listen on the pod's loopback, where only the HAProxy sidecar
    (``front_proxy.CLUSTER_LISTEN_PORT``, every interface) reaches them; the rest of ``http_options`` is kept."""
    config = copy.deepcopy(serve_config)
    config["http_options"] = {**(config.get("http_options") or {}), "host": "127.0.0.1",
                              "port": front_proxy.CLUSTER_SERVE_PORT}
    return config


def proxies_on_workers(serve_config: dict) -> bool:
    """Whether Serve runs an HTTP proxy on the worker nodes too (``proxy_location``; Serve's default EveryNode)."""
    return serve_config.get("proxy_location", "EveryNode") == "EveryNode"


def front_proxy_configmap(serve_config: dict, *, name: str, source: str) -> dict:
    """The ConfigMap holding the sidecar's ``haproxy.cfg`` and its error files (its keys are flat; the pods' volume
    puts the error files back in their directory)."""
    files = front_proxy.cluster_files(serve_config, source)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-front-proxy"},
            "data": {Path(relative).name: text for relative, text in files.items()}}


def _front_proxy_volume(configmap: dict) -> dict:
    items = [{"key": key, "path": key if key == front_proxy.CONFIG_NAME else f"{front_proxy.ERRORS_DIR}/{key}"}
             for key in configmap["data"]]
    return {"name": FRONT_PROXY_VOLUME, "configMap": {"name": configmap["metadata"]["name"], "items": items}}


def _front_proxy_container() -> dict:
    port = front_proxy.CLUSTER_LISTEN_PORT
    requests = {"cpu": "500m", "memory": "256Mi"}  # 4000 connections x two 16 KB buffers: 128 MiB at most
    return {
        "name": FRONT_PROXY_CONTAINER,
        "image": FRONT_PROXY_IMAGE,
        "command": ["haproxy", "-W", "-db", "-f", f"{FRONT_PROXY_CONFIG_DIR}/{front_proxy.CONFIG_NAME}"],
        "ports": [{"containerPort": port, "name": "http"}],
        # Half a core asked for, one allowed: a worker pod still fits an 8-vCPU node beside the Ray container's 6.
        "resources": {"limits": {"cpu": "1", "memory": requests["memory"]}, "requests": requests},
        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 5},
        "volumeMounts": [{"name": FRONT_PROXY_VOLUME, "mountPath": FRONT_PROXY_CONFIG_DIR, "readOnly": True}],
    }


def _with_front_proxy(pod: dict, configmap: dict) -> dict:
    """``pod`` with the HAProxy sidecar after the Ray container (KubeRay takes the first container for Ray's)."""
    digest = hashlib.sha256(json.dumps(configmap["data"], sort_keys=True).encode()).hexdigest()
    spec = pod["spec"]
    spec["containers"].append(_front_proxy_container())
    spec["volumes"].append(_front_proxy_volume(configmap))
    return {"metadata": {"annotations": {FRONT_PROXY_DIGEST_ANNOTATION: digest}}, "spec": spec}


class DeploymentDemand(NamedTuple):
    """What one deployment asks Ray for: per replica (logical CPUs and GPUs), and its most replicas."""

    name: str
    cpus: float
    gpus: float
    max_replicas: int
    min_replicas: int = 1


class ResourceDemand(NamedTuple):
    """Every deployment's demand, with the totals the cluster configs are sized by (logical CPUs/GPUs)."""

    deployments: tuple[DeploymentDemand, ...]

    @property
    def models(self) -> tuple[DeploymentDemand, ...]:
        """The deployments asking for a GPU share: one replica of each is what a GPU worker must hold."""
        return tuple(d for d in self.deployments if d.gpus > 0)

    @property
    def cpu_only(self) -> tuple[DeploymentDemand, ...]:
        return tuple(d for d in self.deployments if d.gpus == 0)

    def replica_set(self, deployments: tuple[DeploymentDemand, ...] | None = None) -> tuple[float, float]:
        """(CPUs, GPUs) for one replica of each of ``deployments`` (default: all of them)."""
        chosen = self.deployments if deployments is None else deployments
        return _sum(d.cpus for d in chosen), _sum(d.gpus for d in chosen)

    def at_min_replicas(self) -> tuple[float, float]:
        """(CPUs, GPUs) with every deployment at its autoscaling min_replicas: what is always held."""
        return (_sum(d.cpus * d.min_replicas for d in self.deployments),
                _sum(d.gpus * d.min_replicas for d in self.deployments))

    def at_max_replicas(self) -> tuple[float, float]:
        """(CPUs, GPUs) with every deployment at its autoscaling max_replicas."""
        return (_sum(d.cpus * d.max_replicas for d in self.deployments),
                _sum(d.gpus * d.max_replicas for d in self.deployments))


def _sum(values) -> float:
    # Fractions such as 0.2 + 0.1 do not add up exactly in binary: 6 decimals is finer than any share.
    return round(sum(values), 6)


def resource_demand(serve_config: dict) -> ResourceDemand:
    """Each deployment's ``ray_actor_options`` and most replicas, with Serve's defaults where unset
    (``num_cpus`` 1, ``num_gpus`` 0; ``num_replicas``, else 1, without an ``autoscaling_config``)."""
    found = []
    for app in serve_config["applications"]:
        for deployment in app.get("deployments", []):
            options = deployment.get("ray_actor_options") or {}
            cpus = options.get("num_cpus")
            scaling = deployment.get("autoscaling_config") or {}
            most = scaling.get("max_replicas", deployment.get("num_replicas", 1))
            least = scaling.get("min_replicas", 1) if scaling else most
            found.append(DeploymentDemand(deployment["name"], float(1 if cpus is None else cpus),
                                          float(options.get("num_gpus") or 0), int(most), int(least)))
    return ResourceDemand(tuple(found))


def gpu_demand(serve_config: dict) -> GpuDemand:
    demand = resource_demand(serve_config)
    return GpuDemand(demand.replica_set()[1], demand.at_max_replicas()[1],
                     max((d.gpus for d in demand.deployments), default=0.0))


def render_rayservice(
    serve_config: dict,
    *,
    image: str,
    model_store_mount: str = "/models",
    gpu_workers_min: int,
    gpu_workers_max: int,
    gpus_per_worker: int = 1,
    name: str = "festival-serve",
    worker_cpus: int = 6,
    worker_memory: str = "24Gi",
    source: str = "serve_config.yaml",
) -> dict:
    """A KubeRay ``RayService`` (``ray.io/v1``) that serves ``serve_config`` on GPU workers.

    The head runs Ray's control processes only (``num-cpus: "0"``), every pod mounts the
    ``festival-models`` claim at ``model_store_mount``, and the Ray autoscaler adds GPU workers
    when Serve asks for replicas that do not fit. Worker size defaults suit a node with 8 vCPU,
    32 GiB and one GPU (e.g. AWS g5.2xlarge), leaving room for the kubelet and daemon sets. Every pod with a
    Serve proxy runs the HAProxy sidecar, whose config is ``front_proxy_configmap`` (applied beside it).
    """
    if not 0 <= gpu_workers_min <= gpu_workers_max or gpu_workers_max < 1:
        raise ValueError(f"need 0 <= gpu_workers_min <= gpu_workers_max and max >= 1, "
                         f"got {gpu_workers_min}..{gpu_workers_max}")
    if gpus_per_worker < 1:
        raise ValueError(f"gpus_per_worker must be >= 1, got {gpus_per_worker}")
    demand = gpu_demand(serve_config)
    if demand.largest_replica > gpus_per_worker:
        raise ValueError(f"a replica asks for {demand.largest_replica} GPUs but a worker has {gpus_per_worker}")
    if not model_store_mount.startswith("/"):
        raise ValueError(f"model_store_mount must be an absolute path, got {model_store_mount!r}")

    configmap = front_proxy_configmap(serve_config, name=name, source=source)
    workers_proxy = proxies_on_workers(serve_config)
    serve_config = behind_front_proxy(with_model_store(serve_config, model_store_mount))
    # No port named "serve" on the Ray container: Serve's proxy is on the pod's loopback. KubeRay's own probes of
    # it (the operator's of the head, the workers' readiness) then go to port 8000, HAProxy's, which passes
    # /-/healthz through; the Serve Service is spec.serveService below.
    head = _with_front_proxy(_pod_template("ray-head", image, model_store_mount, cpu=2, memory="8Gi", ports=[
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]), configmap)
    worker = _pod_template("ray-worker", image, model_store_mount, cpu=worker_cpus, memory=worker_memory,
                           gpus=gpus_per_worker)
    if workers_proxy:  # proxy_location EveryNode: each worker's proxy takes traffic too, through its own HAProxy
        worker = _with_front_proxy(worker, configmap)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            # A serveConfigV2 change (args, user_config, replicas) is applied in place by Serve's rolling update
            # (max_surge_percent and graceful_shutdown_timeout_s in serve_config.yaml keep every stage serving).
            # A rayClusterConfig change (image, Ray version, pod sizes) brings up a whole new RayCluster, waits
            # until its applications are healthy, then moves traffic (blue/green: needs the GPUs twice over while
            # both run); the old cluster is kept rayClusterDeletionDelaySeconds after the switch, longer than any
            # request's budget (ingress.max_budget_s), so requests already on it finish.
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterDeletionDelaySeconds": RAY_CLUSTER_DELETION_DELAY_S,
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False, width=1000),
            # <name>-serve-svc: the pods with a healthy Serve proxy (KubeRay sets the selector), at HAProxy's port.
            "serveService": {"spec": {"ports": [{"name": "serve", "port": front_proxy.CLUSTER_LISTEN_PORT,
                                                 "targetPort": front_proxy.CLUSTER_LISTEN_PORT}]}},
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                # A GPU worker with no replicas left goes after 5 min: Serve's own downscale delays
                # (120-300 s in serve_config.yaml) already decided the crowd has gone.
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
                # Token auth with a Secret the operator does not rotate per RayCluster, so the
                # token survives RayService upgrades (cluster/README.md, "Token authentication").
                "authOptions": {"mode": "token", "secretName": f"{name}-ray-token"},
                "headGroupSpec": {
                    # num-cpus/num-gpus 0: Ray schedules no replica on the head (every deployment
                    # asks for CPU), so losing a model replica never takes the control plane with it.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
                    "template": head,
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu",
                    "replicas": gpu_workers_min,
                    "minReplicas": gpu_workers_min,
                    "maxReplicas": gpu_workers_max,
                    "rayStartParams": {},  # KubeRay passes the container's GPU/CPU/memory limits to ray start
                    "template": worker,
                }],
            },
        },
    }


def _pod_template(container: str, image: str, mount: str, *, cpu: int, memory: str,
                  gpus: int = 0, ports: list | None = None) -> dict:
    # KubeRay advertises limits (not requests) to Ray and ignores memory/GPU requests, so both
    # are set equal (KubeRay's RayCluster configuration guide).
    resources = {"cpu": str(cpu), "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = gpus
    spec: dict[str, Any] = {
        "name": container,
        "image": image,
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "volumeMounts": [{"name": MODEL_STORE_VOLUME, "mountPath": mount}],
    }
    if ports:
        spec["ports"] = ports
    return {"spec": {
        "containers": [spec],
        "volumes": [{"name": MODEL_STORE_VOLUME, "persistentVolumeClaim": {"claimName": MODEL_STORE_CLAIM}}],
    }}


class _Dumper(yaml.SafeDumper):
    """Block style throughout; multi-line strings (``serveConfigV2``) as literal ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


#: What a GPU node's environment is installed with: onnxruntime-gpu (CUDA 13, as torch) and TensorRT.
IMAGE_INSTALL = "uv sync --frozen --extra gpu --extra tensorrt"


def render_document(serve_config: dict, *, source: str, image: str,
                    gpu_workers_min: int = DEFAULT_GPU_WORKERS_MIN,
                    gpu_workers_max: int = DEFAULT_GPU_WORKERS_MAX, **options: Any) -> str:
    """The text of ``cluster/rayservice.yaml``: a header saying how it was made, then two documents: the front
    proxy's ConfigMap and the RayService (``kubectl apply -f`` takes both)."""
    manifest = render_rayservice(serve_config, image=image, gpu_workers_min=gpu_workers_min,
                                 gpu_workers_max=gpu_workers_max, source=source, **options)
    configmap = front_proxy_configmap(serve_config, name=manifest["metadata"]["name"], source=source)
    header = (
        f"# GENERATED from {source} by festival_serve/ops/manifests.py. Do not edit by hand: change {source}\n"
        f"# (or the options below) and regenerate; tests/test_cluster.py fails while the two differ.\n"
        f"#   python -m festival_serve.ops.manifests render --config {source} --image {image} \\\n"
        f"#       --gpu-workers-min {gpu_workers_min} --gpu-workers-max {gpu_workers_max} --out <this file>\n"
    )
    header += f"# The image holds the locked environment with the GPU runtimes: `{IMAGE_INSTALL}` (cluster/README.md).\n"
    if image == PLACEHOLDER_IMAGE:
        header += f"# {PLACEHOLDER_IMAGE} is a placeholder: render again with your image (cluster/README.md).\n"
    if options:
        header += "# Other options: " + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + "\n"
    listen, serve = front_proxy.CLUSTER_LISTEN_PORT, front_proxy.CLUSTER_SERVE_PORT
    header += (
        f"# Front proxy: every pod with a Serve proxy runs a `{FRONT_PROXY_CONTAINER}` sidecar from `{FRONT_PROXY_IMAGE}`,\n"
        "# the OFFICIAL HAProxy image (Docker Hub, docker.io/library/haproxy; not built by this project; pin its\n"
        f"# digest where images must not move). It listens on port {listen}, the Serve Service's target; Serve's\n"
        f"# proxy listens on the pod's loopback (127.0.0.1:{serve}), which no Service exposes. Its config is the\n"
        "# ConfigMap below, the same as cluster/haproxy.cfg (festival_serve/ops/front_proxy.py; README, \"Security\").\n"
    )
    return header + dump_yaml(configmap) + "---\n" + dump_yaml(manifest)


# -- resource numbers in the hand-written cluster docs -------------------------------------------------------

#: Delimit the generated region of ``cluster/ray-cluster.yaml`` (a YAML comment) and ``cluster/README.md``
#: (an HTML comment); everything between the two marker lines is rewritten by ``cluster docs``.
DOCS_COMMAND = "python -m festival_serve.ops.manifests docs"
BEGIN_MARKER = "BEGIN GENERATED resources"
END_MARKER = "END GENERATED resources"
_REGION = re.compile(rf"^([ \t]*)([^\n]*{BEGIN_MARKER}[^\n]*\n)(.*?)(^[ \t]*[^\n]*{END_MARKER})", re.M | re.S)


class WorkerNode(NamedTuple):
    """A GPU worker as the cluster launcher config declares it: the logical CPUs/GPUs Ray sees."""

    instance_type: str
    cpus: float
    gpus: float


def launcher_worker(launcher: dict) -> WorkerNode:
    """The launcher config's one worker node type (the head advertises nothing for replicas)."""
    types = launcher["available_node_types"]
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    if len(workers) != 1:
        raise ValueError(f"expected one worker node type besides the head, found {len(workers)}")
    [worker] = workers
    if not worker["resources"].get("GPU"):
        raise ValueError("the worker node type advertises no GPU")
    return WorkerNode(worker["node_config"]["InstanceType"], float(worker["resources"]["CPU"]),
                      float(worker["resources"]["GPU"]))


def workers_needed(demand: ResourceDemand, worker: WorkerNode, *, at: str = "max") -> int:
    """Workers that every deployment at its max (or ``at="min"``) replicas needs if packed perfectly: a lower
    bound, since no replica splits across nodes (the launcher and RayService bounds add room above it)."""
    cpus, gpus = demand.at_max_replicas() if at == "max" else demand.at_min_replicas()
    return max(math.ceil(gpus / worker.gpus), math.ceil(cpus / worker.cpus), 1)


def _n(value: float) -> str:
    return f"{round(value, 6):g}"


def _sizing_sentences(demand: ResourceDemand, worker: WorkerNode, code: str = "") -> list[str]:
    """What one replica of each model leaves on one worker, and the workers at max_replicas.
    ``code`` wraps names (a backtick in markdown)."""
    node = f"{code}{worker.instance_type}{code} worker ({_n(worker.cpus)} CPU, {_n(worker.gpus)} GPU)"
    cpus, gpus = demand.replica_set(demand.models)
    cpus_left, gpus_left = round(worker.cpus - cpus, 6), round(worker.gpus - gpus, 6)
    if cpus_left < 0 or gpus_left < 0:
        first = f"One replica of each model ({_n(cpus)} CPU + {_n(gpus)} GPU) does not fit on one {node}."
    else:
        first = (f"On one {node}, one replica of each model takes {_n(cpus)} CPU + {_n(gpus)} GPU, "
                 f"leaving {_n(cpus_left)} CPU and {_n(gpus_left)} GPU")
        room = [f"{math.floor(cpus_left / d.cpus + 1e-9)} {code}{d.name}{code} replicas ({_n(d.cpus)} CPU each)"
                for d in demand.cpu_only if d.cpus > 0]
        first += (": room for " + " or ".join(room) + ".") if room else "."
    max_cpus, max_gpus = demand.at_max_replicas()
    min_cpus, min_gpus = demand.at_min_replicas()
    always = (f"Every deployment at {code}min_replicas{code} holds {_n(min_cpus)} CPU + {_n(min_gpus)} GPU at all "
              f"times: at least {workers_needed(demand, worker, at='min')} such workers.")
    second = (f"Every deployment at {code}max_replicas{code} asks for {_n(max_cpus)} CPU + {_n(max_gpus)} GPU: "
              f"at least {workers_needed(demand, worker)} such workers if packed perfectly.")
    return [first, always, second]


def _wrap(sentences: list[str], width: int) -> list[str]:
    """One paragraph of ``sentences`` in lines of at most ``width`` characters (names never split)."""
    return textwrap.wrap(" ".join(sentences), width, break_long_words=False, break_on_hyphens=False)


def render_readme_block(demand: ResourceDemand, worker: WorkerNode, source: str) -> list[str]:
    """cluster/README.md's region: a table of every deployment's share and the totals, then the sizing."""
    rows = ["| deployment | CPU per replica | GPU per replica | max replicas | CPU at max | GPU at max |",
            "|---|--:|--:|--:|--:|--:|"]
    for d in demand.deployments:
        rows.append(f"| `{d.name}` | {_n(d.cpus)} | {_n(d.gpus)} | {d.max_replicas} | "
                    f"{_n(d.cpus * d.max_replicas)} | {_n(d.gpus * d.max_replicas)} |")
    models, every = demand.replica_set(demand.models), demand.replica_set()
    at_max = demand.at_max_replicas()
    rows += [f"| one replica of each model | {_n(models[0])} | {_n(models[1])} | | | |",
             f"| one replica of every deployment | {_n(every[0])} | {_n(every[1])} | | | |",
             f"| every deployment at `min_replicas` (always held) | {_n(demand.at_min_replicas()[0])} | "
             f"{_n(demand.at_min_replicas()[1])} | | | |",
             f"| every deployment at `max_replicas` | | | | {_n(at_max[0])} | {_n(at_max[1])} |"]
    intro = f"From `{source}` (`ray_actor_options` per replica, `autoscaling_config.max_replicas`):"
    return ["", intro, "", *rows, "", *_wrap(_sizing_sentences(demand, worker, code="`"), 96), ""]


def render_launcher_block(demand: ResourceDemand, worker: WorkerNode, source: str) -> list[str]:
    """cluster/ray-cluster.yaml's region: YAML comments with each deployment's share and the sizing."""
    width = max(len(d.name) for d in demand.deployments)
    lines = [f"{source} asks per replica (ray_actor_options), up to max_replicas:"]
    for d in demand.deployments:
        share = f"{_n(d.cpus)} CPU" + (f" + {_n(d.gpus)} GPU" if d.gpus else "")
        lines.append(f"  {d.name:<{width}}  {share}, up to {d.max_replicas}")
    return ["# " + line for line in lines + _wrap(_sizing_sentences(demand, worker), 94)]


def replace_region(text: str, body: list[str], *, where: str) -> str:
    """``text`` with the lines between its one BEGIN/END marker pair replaced by ``body``, each indented
    like the BEGIN line (a YAML comment under a mapping key, a markdown list item)."""
    regions = list(_REGION.finditer(text))
    if len(regions) != 1:
        raise ValueError(f"{where}: expected one {BEGIN_MARKER!r} ... {END_MARKER!r} region, found {len(regions)}")
    [region] = regions
    indent = region.group(1)
    inner = "".join(f"{indent}{line}\n" if line else "\n" for line in body)
    return text[:region.start(3)] + inner + text[region.end(3):]


def render_docs(serve_config: dict, launcher_text: str, readme_text: str, *,
                source: str = "serve_config.yaml") -> tuple[str, str]:
    """The texts of ray-cluster.yaml and README.md with their generated regions freshly rendered."""
    demand = resource_demand(serve_config)
    worker = launcher_worker(yaml.safe_load(launcher_text))
    return (replace_region(launcher_text, render_launcher_block(demand, worker, source), where="ray-cluster.yaml"),
            replace_region(readme_text, render_readme_block(demand, worker, source), where="README.md"))


# -- the manifest against KubeRay's own schema ---------------------------------------------------------------

#: KubeRay's RayService CRD, vendored at a pinned release (cluster/crd/README.md: source, commit, sha256).
RAYSERVICE_CRD = Path(__file__).resolve().parents[2] / "cluster" / "crd" / "ray.io_rayservices.yaml.gz"


def rayservice_schema(crd_path: Path = RAYSERVICE_CRD, version: str = "v1") -> dict:
    """The ``openAPIV3Schema`` of the CRD's ``version``."""
    import gzip

    with gzip.open(crd_path, "rt") as f:
        crd = yaml.safe_load(f)
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise ValueError(f"{crd_path} has no version {version!r}")


def manifest_errors(manifest: dict, schema: dict) -> list[str]:
    """What the API server (with ``kubectl apply --validate=strict``) would refuse in ``manifest``: schema
    violations (types, enums, required fields), and fields the schema does not declare, which the API server
    would otherwise silently drop (a misspelt field is a setting that never takes effect)."""
    import jsonschema

    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
    return errors + _undeclared_fields(manifest, schema, "")


def _undeclared_fields(value: Any, schema: dict, path: str) -> list[str]:
    if isinstance(value, dict):
        declared = schema.get("properties")
        if declared is None:  # a map (additionalProperties) or a free-form object (metadata, preserve-unknown)
            values = schema.get("additionalProperties")
            if not isinstance(values, dict):
                return []
            return [e for key, item in value.items() for e in _undeclared_fields(item, values, f"{path}.{key}")]
        errors = []
        for key, item in value.items():
            if key in declared:
                errors += _undeclared_fields(item, declared[key], f"{path}.{key}")
            else:
                errors.append(f"{path}.{key}: not a field of this kind".lstrip("."))
        return errors
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [e for i, item in enumerate(value) for e in _undeclared_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def _load(path: Path) -> dict:
    """The serve config at ``path``, checked (``check_serve_config``) before a manifest is made from it."""
    if not path.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    config = yaml.safe_load(path.read_text())
    try:
        check_serve_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def _cmd_render(args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("model_store_mount", args.model_store_mount), ("gpus_per_worker", args.gpus_per_worker),
                                 ("name", args.name)) if v is not None}
    config = _load(args.config)
    text = render_document(config, source=args.config.name, image=args.image,
                           gpu_workers_min=args.gpu_workers_min, gpu_workers_max=args.gpu_workers_max, **options)
    rayservice = next(d for d in yaml.safe_load_all(text) if d and d.get("kind") == "RayService")
    errors = manifest_errors(rayservice, rayservice_schema())
    if errors:  # e.g. an option that renders a value KubeRay's CRD refuses
        raise ValueError("the rendered RayService does not validate against KubeRay's CRD "
                         f"({RAYSERVICE_CRD.name}):\n  " + "\n  ".join(errors))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    demand = gpu_demand(config)
    print(f"wrote {args.out}: RayService from {args.config}, image {args.image}, "
          f"{args.gpu_workers_min}-{args.gpu_workers_max} GPU workers "
          f"({demand.replica_set:g} GPU per replica set, {demand.at_max_replicas:g} at max replicas)")
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    paths = (args.launcher, args.readme)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"not found: {path}")
    current = tuple(path.read_text() for path in paths)
    fresh = render_docs(_load(args.config), *current, source=args.config.name)
    stale = [path for path, old, new in zip(paths, current, fresh) if old != new]
    if args.check:
        for path in stale:
            print(f"{path}: generated resource numbers are stale; regenerate: {DOCS_COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in zip(paths, fresh):
        if path in stale:
            path.write_text(text)
    print(f"{'rewrote ' + ', '.join(map(str, stale)) if stale else 'up to date: ' + ', '.join(map(str, paths))} "
          f"(resources from {args.config})")
    return 0


FRONT_PROXY_COMMAND = "python -m festival_serve.ops.manifests front-proxy --config serve_config.yaml --out-dir cluster"


def _cmd_front_proxy(args: argparse.Namespace) -> int:
    files = front_proxy.cluster_files(_load(args.config), source=args.config.name)
    path = front_proxy.write_files(files, args.out_dir)
    print(f"wrote {path} and {len(files) - 1} error files in {args.out_dir / front_proxy.ERRORS_DIR} "
          f"(HAProxy in front of Serve, from {args.config})")
    return 0


def _cmd_serve_config(args: argparse.Namespace) -> int:
    if not args.model_store.startswith("/"):
        # Replicas do not run in the directory `serve deploy` was called from.
        raise ValueError(f"--model-store must be an absolute path, got {args.model_store!r}")
    text = yaml.safe_dump(with_model_store(_load(args.config), args.model_store), sort_keys=False, width=1000)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {args.config.name} with args.model_store = {args.model_store} (festival_serve/ops/manifests.py)\n"
    args.out.write_text(header + text)
    print(f"wrote {args.out}: {args.config} with model_store {args.model_store}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="festival-serve cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="write the KubeRay RayService manifest for a serve config")
    render.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    render.add_argument("--image", required=True, help="container image with the project installed")
    render.add_argument("--out", type=Path, default=Path("cluster/rayservice.yaml"))
    render.add_argument("--gpu-workers-min", type=int, default=DEFAULT_GPU_WORKERS_MIN)
    render.add_argument("--gpu-workers-max", type=int, default=DEFAULT_GPU_WORKERS_MAX)
    render.add_argument("--gpus-per-worker", type=int, help="nvidia.com/gpu per worker pod (default 1)")
    render.add_argument("--model-store-mount", help="where the model volume is mounted (default /models)")
    render.add_argument("--name", help="RayService name (default festival-serve)")
    render.set_defaults(func=_cmd_render)

    docs = sub.add_parser("docs", help="rewrite the generated resource numbers in cluster/ray-cluster.yaml "
                                       "and cluster/README.md from a serve config")
    docs.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    docs.add_argument("--launcher", type=Path, default=Path("cluster/ray-cluster.yaml"),
                      help="cluster launcher config; its worker node type is what the numbers are sized against")
    docs.add_argument("--readme", type=Path, default=Path("cluster/README.md"))
    docs.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale file")
    docs.set_defaults(func=_cmd_docs)

    proxy = sub.add_parser("front-proxy", help="write the HAProxy front proxy's config and error files that the "
                                               "RayService's sidecar runs (cluster/haproxy.cfg)")
    proxy.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    proxy.add_argument("--out-dir", type=Path, default=Path("cluster"))
    proxy.set_defaults(func=_cmd_front_proxy)

    serve = sub.add_parser("serve-config", help="write the serve config with an absolute model store, for `serve deploy`")
    serve.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    serve.add_argument("--model-store", required=True, help="absolute path of the model store on every node")
    serve.add_argument("--out", type=Path, required=True)
    serve.set_defaults(func=_cmd_serve_config)

    from festival_serve.ops import local_cluster  # `cluster local up|status|down`

    local_cluster.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"festival-serve cluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
