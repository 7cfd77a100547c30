"""Nothing reachable that should not be: with a loopback ``--host``, every socket a process of the Ray session
listens on is on loopback (read from /proc, not from Ray's own account of itself), the metrics port included, but
for the one listener Ray 2.60 gives no way to bind there (``KNOWN_EXCEPTIONS``), which must refuse calls without
Ray's token; Ray's token and the local cluster's state file are owner-only; ``cluster local down`` kills only the
processes it started.

The graph is ``festival-serve up``'s own (``up.local_profile`` + ``up.start``) over an empty model store: every
replica starts (degraded), which is every kind of Ray process a running graph has.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from festival_serve.ops import local_cluster, up

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]



@dataclass(frozen=True)
class KnownException:
    """A listener beyond loopback that Ray binds so whatever its node's address: one wildcard socket (every
    interface) in each process whose title starts with ``process``."""

    process: str
    reason: str


#: With its node on 127.0.0.1 every Ray process binds loopback (up.LOCAL_RAY_ENV), except these.
KNOWN_EXCEPTIONS = (
    KnownException("ray::ServeReplica:", "Serve's inter-deployment gRPC server: every replica binds it on [::]:0, "
                   "written into Ray 2.60 (ray/serve/_private/replica.py, Replica._on_initialized: "
                   "add_port_to_grpc_server(self._server, \"[::]:0\")), no option or variable changes it. It checks "
                   "Ray's token on every call while token auth is on (create_grpc_server_with_interceptors), as "
                   "`festival-serve up` runs Ray"),
)


# -- what listens, read from /proc -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    pid: int
    protocol: str  # "tcp" (LISTEN) or "udp" (bound, unconnected)
    host: str
    port: int
    cmdline: str

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.host)
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1: gRPC's dual-stack form of 127.0.0.1
        return (mapped or address).is_loopback

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified

    def __str__(self) -> str:
        return f"{self.protocol} {self.host}:{self.port}  pid {self.pid}  {self.cmdline[:140]}"


def _address(field: str) -> tuple[str, int]:
    """``0100007F:1F90`` (/proc/net/tcp: the address as 32-bit words in host byte order, little-endian on x86 and
    arm64) → host, port."""
    hexhost, hexport = field.split(":")
    raw = bytes.fromhex(hexhost)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words), int(hexport, 16)


def _sockets() -> dict[int, tuple[str, str, int]]:
    """Listening sockets of this network namespace by inode: TCP in LISTEN (0A), UDP bound to no peer (07)."""
    found = {}
    for protocol, state in (("tcp", "0A"), ("udp", "07")):
        for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == state and fields[2].split(":")[1] == "0000":
                        found[int(fields[9])] = (protocol, *_address(fields[1]))
    return found


def listeners(pids) -> list[Listener]:
    """What ``pids`` listen on: each one's socket fds (/proc/<pid>/fd → socket:[inode]) matched to ``_sockets``."""
    sockets, out = _sockets(), []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
        for link in links:
            if link.startswith("socket:[") and (inode := int(link[8:-1])) in sockets:
                out.append(Listener(pid, *sockets[inode], cmdline))
    return sorted(set(out), key=lambda l: (l.pid, l.protocol, l.port))


def session_pids() -> set[int]:
    """This process (the driver) and everything it started: Ray's GCS, raylet, dashboard and monitors are its
    children, and the raylet's children are the agents and every worker (replicas, proxy, controller)."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.children(recursive=True))}


def known_exception(listener: Listener) -> KnownException | None:
    return next((k for k in KNOWN_EXCEPTIONS if listener.wildcard and listener.cmdline.startswith(k.process)), None)


def beyond_loopback(found: list[Listener]) -> tuple[list[Listener], list[Listener]]:
    """The listeners beyond loopback: (unexplained, known exceptions). A process with more wildcard sockets than its
    exception's one has them all unexplained."""
    exposed = [l for l in found if not l.loopback]
    per_pid = {pid: [l for l in exposed if l.pid == pid] for pid in {l.pid for l in exposed}}
    known = [l for l in exposed if known_exception(l) and len(per_pid[l.pid]) == 1]
    return [l for l in exposed if l not in known], known


# -- a running graph -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def graph(tmp_path_factory, metrics_port):
    """``festival-serve up --host 127.0.0.1`` over an empty model store, one replica of each deployment."""
    port = free_port()
    config, _ = up.local_profile(up.load_config(ROOT / "serve_config.yaml"), host="127.0.0.1", port=port,
                                 model_store=str(tmp_path_factory.mktemp("empty-store")), has_gpu=False, base_dir=ROOT)
    app = config["applications"][0]
    app["args"]["sign_reader"].update(rec_model=None, rec_dict=None)  # PP-OCR's own recognizer: the wheel ships it
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    up.start(config, offline=True, num_cpus=2, metrics_port=metrics_port)
    try:
        up.wait_until_running(timeout_s=420, progress=lambda line: None)
        yield port
    finally:
        up.stop()



@pytest.mark.timeout(600)
def test_every_ray_listener_of_a_loopback_graph_is_on_loopback(graph, metrics_port):
    import ray

    found = listeners(session_pids())
    print("\nlisteners of the Ray session:\n  " + "\n  ".join(map(str, found)))
    # The scan must see Ray's own processes, or an empty answer would pass: every port Ray reports for its node,
    # and a listening process for Serve's controller, its proxy and every deployment's replica.
    node = ray.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    assert {gcs_port, node["NodeManagerPort"], node["ObjectManagerPort"], metrics_port, graph} <= {l.port for l in found}
    titles = {l.cmdline for l in found}
    actors = {"ray::ServeController", "ray::ProxyActor",
              *(f"ray::ServeReplica:festival:{d['name']}" for d in up.load_config(ROOT / "serve_config.yaml")
                ["applications"][0]["deployments"])}
    assert actors <= titles, f"not seen listening: {sorted(actors - titles)}"
    unexplained, known = beyond_loopback(found)
    assert not unexplained, "listening beyond loopback:\n  " + "\n  ".join(map(str, unexplained))
    for listener in known:
        print(f"known exception: {listener}\n  {known_exception(listener).reason}")


@pytest.mark.timeout(600)
def test_what_ray_binds_beyond_loopback_refuses_calls_without_rays_token(graph):
    import grpc

    _, known = beyond_loopback(listeners(session_pids()))
    if up.ray_token_path() is None and not os.environ.get("RAY_AUTH_TOKEN"):
        pytest.skip("Ray's token auth is off here: nothing to check the exceptions against")
    assert known  # one per replica, in Ray 2.60
    for listener in known:  # the wildcard socket answers on loopback too; what matters is that it asks for the token
        with grpc.insecure_channel(f"127.0.0.1:{listener.port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (listener, refused.value)


@pytest.mark.timeout(600)
def test_the_metrics_port_listens_on_loopback_only(graph, metrics_port):
    on_port = [l for l in listeners(session_pids()) if l.port == metrics_port and l.protocol == "tcp"]
    assert on_port and all(l.loopback for l in on_port), on_port
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).status_code == 200


@pytest.mark.timeout(600)
def test_rays_token_file_is_owner_only(graph):
    path = up.ray_token_path()
    if path is None:
        pytest.skip("Ray reads no token file here (RAY_AUTH_MODE is not token, or RAY_AUTH_TOKEN holds it)")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- settings, no Ray ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("http_host", "requested", "expected"), [
    ("127.0.0.1", None, "127.0.0.1"), ("::1", None, "127.0.0.1"), ("localhost", None, "127.0.0.1"),
    ("0.0.0.0", None, "0.0.0.0"), ("127.0.0.1", "0.0.0.0", "0.0.0.0"), ("0.0.0.0", "127.0.0.1", "127.0.0.1"),
])
def test_metrics_follow_a_loopback_host_unless_asked_otherwise(http_host, requested, expected):
    assert up.metrics_host_for(http_host, requested) == expected


def test_a_metrics_host_ray_cannot_bind_alone_is_refused():
    with pytest.raises(ValueError, match="loopback or on every interface"):
        up.metrics_host_for("127.0.0.1", "192.0.2.7")


def test_rays_token_is_written_owner_only_and_a_readable_one_is_tightened(tmp_path, monkeypatch):
    path = tmp_path / "ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert up.private_ray_token(create=False) == path and not path.exists()  # joining: never invent a token
    assert up.private_ray_token(create=True) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # as Ray writes its own: 256 random bits, hex
    path.chmod(0o644)
    up.private_ray_token(create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token  # tightened, kept
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert up.private_ray_token(create=True) is None


def test_the_local_cluster_state_file_is_owner_only(tmp_path):
    path = tmp_path / "state" / "local-cluster.json"
    local_cluster.write_state(path, {"up_pid": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)  # one written before this was kept owner-only
    local_cluster.write_state(path, {"up_pid": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text()) == {"up_pid": 2}


# -- `cluster local down` and stale pids ---------------------------------------------------------------------------


@pytest.fixture
def sleepers():
    """Two live processes that are not a cluster's: what a reused pid points at."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _down(tmp_path, state: dict) -> None:
    path = tmp_path / "local-cluster.json"
    local_cluster.write_state(path, state)
    assert local_cluster.cmd_down(argparse.Namespace(state_file=str(path), grace=1.0)) == 0
    assert not path.exists()


def test_down_leaves_alone_pids_that_are_no_longer_the_processes_it_recorded(tmp_path, sleepers, capsys):
    up_proc, node_proc = sleepers
    started = local_cluster.recorded([up_proc.pid, node_proc.pid])
    stale = {pid: t - 3600 for pid, t in started.items()}  # recorded an hour before these processes began
    _down(tmp_path, {"up_pid": up_proc.pid, "nodes": {"n1": [node_proc.pid]}, "started": stale})
    time.sleep(0.2)
    assert up_proc.poll() is None and node_proc.poll() is None  # neither signalled
    err = capsys.readouterr().err
    assert f"pid {up_proc.pid} (the up process) is not the process" in err
    assert f"pid {node_proc.pid} (a node process) is not the process" in err


def test_down_leaves_alone_pids_recorded_without_a_start_time(tmp_path, sleepers, capsys):
    up_proc, node_proc = sleepers
    _down(tmp_path, {"up_pid": up_proc.pid, "nodes": {"n1": [node_proc.pid]}})  # a state file from before
    time.sleep(0.2)
    assert up_proc.poll() is None and node_proc.poll() is None
    assert "left alone" in capsys.readouterr().err


def test_down_kills_the_node_processes_it_recorded(tmp_path, sleepers, capsys):
    _, node_proc = sleepers
    _down(tmp_path, {"nodes": {"n1": [node_proc.pid]}, "started": local_cluster.recorded([node_proc.pid])})
    assert node_proc.wait(10) == -9
    assert "1 leftover node process(es) killed" in capsys.readouterr().out
