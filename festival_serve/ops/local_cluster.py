"""``festival-serve cluster local up|status|down``: a real multi-node Ray cluster on this machine.

A head node and ``--workers`` worker nodes, each its own raylet, object store and worker processes
(``ray.cluster_utils.Cluster``: what Ray's own multi-node tests use), started by the ``up`` process and
stopped with it. Worker nodes advertise ``--gpus-per-node`` **fake** GPUs and a logical CPU share, and
``serve_config.yaml`` is deployed with its real ``num_gpus`` fractions (``local_profile(fake_gpus=True)``):
Ray places every replica by its GPU share exactly as on a GPU cluster, while the maths runs on this
machine's CPU. The head advertises no GPU (as a KubeRay head pod), and Serve's HTTP proxy runs on the
head only (every node shares this host's port).

Every node is on 127.0.0.1: every Ray port of the cluster listens on loopback only (``up.LOCAL_RAY_ENV``); only
Serve's HTTP proxy listens on ``--host``.

``status`` reads placements from Ray's state API: each replica's node and resource share, and each
node's GPU total against what its replicas hold. ``down`` signals the ``up`` process, then kills any
process of the nodes still alive (their pids and start times are in the state file ``up`` writes, owner-only;
a pid that is no longer the process recorded is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from festival_serve.serving.autoscaling import ARRIVALS_PER_S, CROPS_IN_FLIGHT

#: Where ``up`` records the cluster's address and the pids it started; ``status`` and ``down`` read it.
DEFAULT_STATE_FILE = Path("~/.cache/festival-serve/local-cluster.json")
#: Serve replicas are Ray actors of this class-name prefix.
REPLICA_PREFIX = "ServeReplica:"
#: Tolerance when adding up fractional GPU shares (0.2 + 0.1 + ... in floating point).
SHARE_EPSILON = 1e-6
#: The address of every node: one machine, so Ray's own traffic never needs to leave loopback.
NODE_ADDRESS = "127.0.0.1"
#: How far a recorded start time may be from the one read later for the same process: psutil adds the start (clock
#: ticks since boot, /proc/<pid>/stat) to the boot time each process reads from /proc/stat, which the clock's
#: adjustments can move by up to a second. A reused pid started well after: its process had to exit first.
START_TIME_SLACK_S = 1.0


@dataclass(frozen=True)
class ClusterShape:
    workers: int = 2
    gpus_per_node: float = 1.0  # fake GPUs each worker node advertises
    cpus_per_node: float = 2.0  # logical CPUs each worker advertises: a scheduling share, not cores
    head_cpus: float = 1.0  # the controller, the proxy and (space permitting) ingress replicas
    object_store_mb: int = 512  # per node: frames are ~1 MB each, and every node's store takes RAM

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("a local cluster needs at least one worker node (--workers)")
        if self.gpus_per_node < 0 or self.cpus_per_node <= 0 or self.head_cpus < 0:
            raise ValueError("--gpus-per-node must be >= 0 and --cpus-per-node > 0")


def start_nodes(shape: ClusterShape):
    """Start the head and the worker nodes (each a raylet with its own object store) on loopback; returns the
    Cluster. The local Ray settings (``up.LOCAL_RAY_ENV``) are set in this process first, so every node's processes
    inherit them, and before Ray is imported: its workers then run this interpreter, not a `uv run` of their own,
    and a driver of this process reaches the nodes on 127.0.0.1 (not this machine's address, where nothing listens)."""
    from festival_serve.ops import up

    up.apply_local_ray_env()
    from ray.cluster_utils import Cluster

    up.node_address(NODE_ADDRESS)  # refuses when Ray is not in its local-only mode
    up.private_ray_token(create=True)  # before the GCS starts: in token mode it reads the token once
    store = shape.object_store_mb * 1024 * 1024
    # Cluster hands these to each node's RayParams as they are (ray.init and `ray start` would turn 127.0.0.1 into
    # this machine's address).
    node = {"node_ip_address": NODE_ADDRESS, "object_store_memory": store}
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": shape.head_cpus, "num_gpus": 0, **node})
    for _ in range(shape.workers):
        cluster.add_node(num_cpus=shape.cpus_per_node, num_gpus=shape.gpus_per_node, **node)
    cluster.wait_for_nodes()
    return cluster


def node_pids(cluster) -> dict[str, list[int]]:
    """Every process each node of ``cluster`` started (raylet, GCS, object store, …), by node id."""
    pids: dict[str, list[int]] = {}
    for node in cluster.list_all_nodes():
        found = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
        pids[node.node_id] = sorted(found)
    return pids


#: ``festival-serve load`` compresses a festival day into ~10 minutes; the autoscaler's delays shrink with it.
COMPRESSED_UPSCALE_DELAY_S = 3.0
COMPRESSED_DOWNSCALE_DELAY_S = 30.0
#: serve_config's graph-metric targets are sized for GPU nodes (the reader reads a batch of 32 crops in
#: milliseconds; an ingress replica takes 40 arrivals/s). This host serves ~9 frames/s and reads a crop in tens of
#: ms, so a compressed day scales at loads it reaches here: 8 arrivals/s an ingress replica (a 4x surge offers
#: ~36), 4 crops a reader replica (one frame's signs).
LOCAL_TARGETS = {ARRIVALS_PER_S: 8.0, CROPS_IN_FLIGHT: 4.0}
#: Under ``--autoscaling queue-length`` the ingress's own target (128 in flight, for GPU nodes) is lowered likewise:
#: one ingress replica here holds ~20-40 requests at saturation.
LOCAL_INGRESS_TARGET_ONGOING = 16
#: Serve averages the load over this window (its default, 30 s, is half of a compressed surge).
COMPRESSED_LOOK_BACK_S = 10.0
#: ``--autoscaling`` choices: the graph's own load metrics (serve_config.yaml as written), or Serve's default
#: queue-length rule for every deployment (the custom policies removed), to compare the two.
AUTOSCALING_CHOICES = ("graph", "queue-length")


def compress_autoscaling(config: dict, policy: str = "graph") -> list[str]:
    """Shorten every deployment's up/down-scale delays for a compressed day, and scale the ingress at the load
    one host can carry (``policy`` "queue-length": drop the custom policies); returns the change lines."""
    if policy not in AUTOSCALING_CHOICES:
        raise ValueError(f"unknown autoscaling {policy!r}; choose one of {', '.join(AUTOSCALING_CHOICES)}")
    changes = [f"autoscaling for a compressed day: up after {COMPRESSED_UPSCALE_DELAY_S:g} s, down after "
               f"{COMPRESSED_DOWNSCALE_DELAY_S:g} s, load averaged over {COMPRESSED_LOOK_BACK_S:g} s"]
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            scaling = deployment.get("autoscaling_config")
            if not scaling:
                continue
            scaling["upscale_delay_s"] = min(scaling.get("upscale_delay_s", 30.0), COMPRESSED_UPSCALE_DELAY_S)
            scaling["downscale_delay_s"] = min(scaling.get("downscale_delay_s", 600.0), COMPRESSED_DOWNSCALE_DELAY_S)
            scaling["look_back_period_s"] = COMPRESSED_LOOK_BACK_S
            custom = scaling.get("policy")
            if custom and policy == "queue-length":
                del scaling["policy"]
                if custom.get("policy_kwargs", {}).get("metric") == ARRIVALS_PER_S:
                    scaling["target_ongoing_requests"] = LOCAL_INGRESS_TARGET_ONGOING
                changes.append(f"{deployment['name']}: Serve's queue-length policy (target "
                               f"{scaling.get('target_ongoing_requests', 2):g} requests a replica)")
            elif custom and custom.get("policy_kwargs", {}).get("metric") in LOCAL_TARGETS:
                kwargs = custom["policy_kwargs"]
                kwargs["target_per_replica"] = LOCAL_TARGETS[kwargs["metric"]]
                changes.append(f"{deployment['name']}: scales at {kwargs['target_per_replica']:g} {kwargs['metric']} "
                               "a replica (a load this host reaches)")
    return changes


# -- what runs where (Ray's state API) --------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """One Serve replica: its deployment, node and the resources Ray reserved for it."""

    deployment: str
    node_id: str
    gpu: float
    cpu: float
    pid: int


@dataclass(frozen=True)
class NodeTotal:
    node_id: str
    alive: bool
    gpus: float  # what the node advertises
    gpus_held: float  # what the replicas on it reserved
    cpus: float


def placements() -> list[Placement]:
    """The live Serve replicas of the connected cluster and where Ray put them."""
    from ray.util.state import list_actors

    out = []
    for actor in list_actors(detail=True, filters=[("state", "=", "ALIVE")], limit=10_000):
        if not actor.class_name.startswith(REPLICA_PREFIX):
            continue
        deployment = actor.class_name[len(REPLICA_PREFIX):].split(":")[-1]  # ServeReplica:<app>:<deployment>
        resources = actor.required_resources or {}
        out.append(Placement(deployment, actor.node_id, float(resources.get("GPU", 0.0)),
                             float(resources.get("CPU", 0.0)), int(actor.pid or 0)))
    return sorted(out, key=lambda p: (p.deployment, p.node_id))


def node_totals(replicas: list[Placement]) -> list[NodeTotal]:
    """Each node of the connected cluster: its GPUs, and how much of them its replicas hold."""
    import ray

    held: dict[str, float] = {}
    for replica in replicas:
        held[replica.node_id] = held.get(replica.node_id, 0.0) + replica.gpu
    return [NodeTotal(node["NodeID"], bool(node["Alive"]), float(node["Resources"].get("GPU", 0.0)),
                      round(held.get(node["NodeID"], 0.0), 6), float(node["Resources"].get("CPU", 0.0)))
            for node in ray.nodes()]


def overcommitted(nodes: list[NodeTotal]) -> list[str]:
    """Nodes whose replicas hold more GPU than the node has (Ray must never let this happen)."""
    return [f"node {n.node_id[:8]} holds {n.gpus_held:g} GPU but has {n.gpus:g}"
            for n in nodes if n.gpus_held > n.gpus + SHARE_EPSILON]


def status_lines(replicas: list[Placement], nodes: list[NodeTotal]) -> list[str]:
    names = {n.node_id: f"node-{i} {n.node_id[:8]}" + (" (head)" if n.gpus == 0 else "")
             for i, n in enumerate(sorted(nodes, key=lambda n: (n.gpus > 0, n.node_id)))}
    lines = ["nodes:"]
    for n in sorted(nodes, key=lambda n: names[n.node_id]):
        lines.append(f"  {names[n.node_id]:24} {'alive' if n.alive else 'DEAD':5}  GPU {n.gpus_held:g} of {n.gpus:g} "
                     f"held  CPU {n.cpus:g}")
    lines.append("replicas:")
    for r in replicas:
        lines.append(f"  {r.deployment:16} on {names.get(r.node_id, r.node_id[:8]):24} GPU {r.gpu:g}  CPU {r.cpu:g}  "
                     f"pid {r.pid}")
    lines += [f"OVERCOMMITTED: {line}" for line in overcommitted(nodes)]
    return lines


# -- the commands ------------------------------------------------------------------------------------------


def _state_path(args: argparse.Namespace) -> Path:
    return Path(args.state_file).expanduser()


def write_state(path: Path, state: dict) -> None:
    """Write the state file owner-only (0600; its folder 0700 when made here): it names the cluster's address and
    the pids ``down`` kills."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a file that was there keeps its mode through O_CREAT
        f.write(json.dumps(state, indent=2))


def recorded(pids: list[int]) -> dict[str, float]:
    """``pids`` with their start times (seconds since the epoch, from /proc/<pid>/stat), keyed by pid as JSON writes
    it; gone ones left out. A pid and its start time name one process: the kernel reuses pids, never both."""
    out = {}
    for pid in pids:
        try:
            out[str(pid)] = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            pass
    return out


def recorded_process(state: dict, pid: int) -> psutil.Process | None:
    """Process ``pid`` if it is still the one the state file recorded (same start time), else None. A pid recorded
    without its start time (a state file from before they were kept) cannot be told from a reused one: None. Signal
    the returned object: psutil checks again, before each signal, that its pid was not reused meanwhile."""
    then = state.get("started", {}).get(str(pid))
    try:
        process = psutil.Process(pid)
        return process if then is not None and abs(process.create_time() - then) < START_TIME_SLACK_S else None
    except psutil.NoSuchProcess:
        return None


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no local cluster recorded in {path}: start one with `festival-serve cluster "
                                "local up`") from None


def cluster_config(config: dict, profile: dict, *, has_gpu: bool) -> tuple[dict, list[str]]:
    """``config`` (serve_config.yaml) as this cluster runs it: the local profile with fake GPUs (``profile``: the
    ``up`` options, kept in the state file so a later ``deploy`` applies the same), the proxy on the head, the
    compressed autoscaling; checked. Returns it and one line per change."""
    from festival_serve.ops import up
    from festival_serve.pipeline.serve_config import check_serve_config

    config, changes = up.local_profile(config, host=profile["host"], port=profile["port"],
                                          model_store=profile["model_store"], has_gpu=has_gpu,
                                          base_dir=Path(profile["base_dir"]), fake_gpus=not has_gpu,
                                          max_replicas=profile["max_replicas"])
    config["proxy_location"] = "HeadOnly"
    changes.append("proxy on the head node only: every node of this cluster shares this host's HTTP port")
    changes += compress_autoscaling(config, profile["autoscaling"])
    check_serve_config(config)
    return config, changes


def redeploy(config: dict) -> None:
    """Submit ``config`` to the Serve instance of the connected cluster (non-blocking), as ``serve deploy`` does:
    Serve applies the difference, a ``user_config`` change in place and other changes by a rolling update."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)


def cmd_up(args: argparse.Namespace) -> int:
    from festival_serve.ops import up
    from festival_serve.runtime.devices import cuda_available

    state_path = _state_path(args)
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if recorded_process(old, old.get("up_pid", -1)):
            print(f"festival-serve cluster: a local cluster is already up (pid {old['up_pid']}); "
                  "`festival-serve cluster local down` stops it", file=sys.stderr)
            return 2
    if up.port_in_use(args.port):
        print(f"festival-serve cluster: port {args.port} is in use; pass --port", file=sys.stderr)
        return 2
    shape = ClusterShape(args.workers, args.gpus_per_node, args.cpus_per_node, args.head_cpus, args.object_store_mb)
    has_gpu = cuda_available()
    profile = {"host": args.host, "port": args.port, "model_store": args.model_store, "base_dir": str(Path.cwd()),
               "max_replicas": args.max_replicas, "autoscaling": args.autoscaling}
    config, changes = cluster_config(up.load_config(args.config), profile, has_gpu=has_gpu)
    print(f"festival-serve cluster: head + {shape.workers} worker node(s), {shape.gpus_per_node:g} "
          f"{'fake ' if not has_gpu else ''}GPU(s) and {shape.cpus_per_node:g} logical CPUs each")
    for change in changes:
        print(f"  {change}")
    up.prepare_models(config, has_gpu=has_gpu)
    started = time.monotonic()
    cluster = start_nodes(shape)
    nodes = node_pids(cluster)
    state = {"address": cluster.address, "up_pid": os.getpid(), "head": cluster.head_node.node_id,
             "nodes": nodes, "started": recorded([os.getpid(), *(pid for pids in nodes.values() for pid in pids)]),
             "profile": profile, "deployed": config}
    write_state(state_path, state)
    print(f"festival-serve cluster: {len(state['nodes'])} nodes up in {time.monotonic() - started:.0f} s at "
          f"{cluster.address} (state: {state_path})")
    stopping = False

    def stop(exit_code: int = 0) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nfestival-serve cluster: stopping Serve and every node …")
        try:
            up.stop()
        finally:
            cluster.shutdown()
            state_path.unlink(missing_ok=True)
        sys.exit(exit_code)

    signal.signal(signal.SIGINT, lambda *_: stop())
    signal.signal(signal.SIGTERM, lambda *_: stop())
    try:
        up.start(config, offline=not args.allow_network, address=cluster.address)
        up.wait_until_running(args.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"festival-serve cluster: {e}", file=sys.stderr)
        stop(1)
    replicas = placements()
    print("\n".join(status_lines(replicas, node_totals(replicas))))
    url = f"http://{args.host}:{args.port}"
    print(f"festival-serve cluster: serving {url}  (`festival-serve cluster local status`; Ctrl-C or "
          "`festival-serve cluster local down` stops every node)")
    while True:
        time.sleep(3600)


def cmd_status(args: argparse.Namespace) -> int:
    from festival_serve.ops import up

    up.apply_local_ray_env()  # before Ray is imported: a driver under `uv run` would upload this directory for workers
    import ray

    state = _read_state(_state_path(args))
    ray.init(address=state["address"], logging_level="ERROR", log_to_driver=False)
    try:
        replicas = placements()
        lines = status_lines(replicas, node_totals(replicas))
    finally:
        ray.shutdown()
    print("\n".join(lines))
    return 1 if any(line.startswith("OVERCOMMITTED") for line in lines) else 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Redeploy a (changed) serve config onto the running cluster with the options ``up`` was given, and wait
    for Serve's rolling update to finish."""
    from festival_serve.ops import up
    from festival_serve.runtime.devices import cuda_available

    up.apply_local_ray_env()  # before Ray is imported, as in cmd_status
    import ray

    path = _state_path(args)
    state = _read_state(path)
    config, _ = cluster_config(up.load_config(args.config), state["profile"], has_gpu=cuda_available())
    ray.init(address=state["address"], logging_level="ERROR", log_to_driver=False)
    try:
        started = time.monotonic()
        redeploy(config)
        time.sleep(1.0)  # the controller marks the application DEPLOYING before the first poll
        up.wait_until_running(args.timeout)
        state["deployed"] = config
        write_state(path, state)
        print(f"festival-serve cluster: {args.config} deployed in {time.monotonic() - started:.0f} s")
    finally:
        ray.shutdown()
    return 0


def _skip_line(pid: int, what: str) -> str:
    return (f"festival-serve cluster: pid {pid} ({what}) is not the process the state file recorded (it exited and "
            "the pid was reused, or the file predates start times); left alone")


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the ``up`` process, then kill what is left of its nodes: only pids that are still the processes
    recorded (``recorded_process``), never whatever took a pid over since."""
    path = _state_path(args)
    state = _read_state(path)
    up_pid = state.get("up_pid")
    if up_pid and psutil.pid_exists(up_pid):
        if (process := recorded_process(state, up_pid)) is None:
            print(_skip_line(up_pid, "the up process"), file=sys.stderr)
        else:
            try:
                process.send_signal(signal.SIGINT)
                process.wait(args.grace)
            except psutil.TimeoutExpired:
                print(f"festival-serve cluster: the up process ({up_pid}) did not stop in {args.grace:g} s; killing "
                      "its nodes", file=sys.stderr)
            except psutil.NoSuchProcess:
                pass
    killed = 0
    for pid in sorted({pid for pids in state.get("nodes", {}).values() for pid in pids if psutil.pid_exists(pid)}):
        if (process := recorded_process(state, pid)) is None:
            print(_skip_line(pid, "a node process"), file=sys.stderr)
            continue
        try:
            process.kill()
            killed += 1
        except psutil.NoSuchProcess:
            pass
    path.unlink(missing_ok=True)
    print(f"festival-serve cluster: down ({killed} leftover node process(es) killed)")
    return 0


def add_parser(sub) -> None:
    """``cluster local …`` under ``festival-serve cluster``'s subcommands."""
    local_parser = sub.add_parser("local", help="a multi-node Ray cluster on this machine, with fake GPUs")
    commands = local_parser.add_subparsers(dest="local_command", required=True)
    defaults = ClusterShape()
    up = commands.add_parser("up", help="start a head and worker nodes and deploy the graph (Ctrl-C stops all)")
    up.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    up.add_argument("--workers", type=int, default=defaults.workers)
    up.add_argument("--gpus-per-node", type=float, default=defaults.gpus_per_node,
                    help="fake GPUs each worker advertises (default %(default)s)")
    up.add_argument("--cpus-per-node", type=float, default=defaults.cpus_per_node,
                    help="logical CPUs each worker advertises: a scheduling share, not cores (default %(default)s)")
    up.add_argument("--head-cpus", type=float, default=defaults.head_cpus)
    up.add_argument("--object-store-mb", type=int, default=defaults.object_store_mb)
    up.add_argument("--max-replicas", type=int, default=2,
                    help="cap on each deployment's replicas (memory: a describer replica is ~2.5 GB; default 2)")
    up.add_argument("--autoscaling", choices=AUTOSCALING_CHOICES, default="graph",
                    help="graph: serve_config's policies on the graph's own load metrics; queue-length: Serve's "
                    "default rule everywhere, for comparison (default %(default)s)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--model-store")
    up.add_argument("--allow-network", action="store_true")
    up.add_argument("--timeout", type=float, default=900, help="seconds for the graph to start")
    deploy = commands.add_parser("deploy", help="redeploy a changed serve config onto the running cluster (a "
                                 "rolling update, as `serve deploy` on a real one)")
    deploy.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    deploy.add_argument("--timeout", type=float, default=900, help="seconds for the update to finish")
    for command in (up, deploy, status := commands.add_parser("status", help="replicas per node and GPU shares"),
                    down := commands.add_parser("down", help="stop the cluster `up` started")):
        command.add_argument("--state-file", default=str(DEFAULT_STATE_FILE))
    down.add_argument("--grace", type=float, default=90, help="seconds for `up` to stop Serve and the nodes")
    up.set_defaults(func=cmd_up)
    deploy.set_defaults(func=cmd_deploy)
    status.set_defaults(func=cmd_status)
    down.set_defaults(func=cmd_down)

