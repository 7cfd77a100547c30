"""HAProxy in front of Ray Serve's HTTP proxy, for deployments that face the public.

Serve's proxy (uvicorn + httptools) has no header timeout, no header or URL size limit and no connection cap:
700 connections that never sent their headers were all still open after 62 s, a 48 MB header section and a
12 MB request target were read to the end, and five requests with a 1 MB ``x-request-id`` grew Serve's logs by
15 MB. Ray's guidance for a public endpoint is a front proxy; this module renders, checks, starts and stops
one (HAProxy 2.6: Debian's ``haproxy`` package, or the official ``haproxy:2.6`` image on KubeRay).

What lives where:

- HAProxy (here): the header deadline, the request head's size (URL, header section, header lines), connection
  caps (in all, and per client address), the request rate per client address, a declared body over the
  ingress's limit, and the headers Serve's proxy itself obeys: ``x-request-disconnect-disabled`` is dropped (a
  client would switch off cancellation on disconnect), ``x-request-timeout-seconds`` is clamped to the ingress's
  ``max_budget_s`` (Serve's proxy takes it as its own timeout; <= 0 means none), an ``x-request-id`` that is not
  a sane id is dropped (Serve logs it). Serve's ``/-/`` paths but ``/-/healthz`` are not served.
- The ingress (``festival_serve.serving``): the body-read deadline (``ingress.body_read_max_s``) and size,
  image pixels, admission and budgets, API keys, the probe rate.

Every error HAProxy answers itself carries the service's JSON error contract
(``{"error": {"code": …, "message": …}}``, ``festival_serve.serving.errors``) — except, in HAProxy 2.6 to 3.2,
the few that its HTTP/1 multiplexer answers before a request exists (headers too slow → 408; a request head
over ``tune.bufsize``, too many header lines or a malformed request → 400): those versions send their built-in
HTML there (upstream fixed it in 3.3, commit d252ec2be, and then this same config answers them in JSON). The
limits below keep those cases to attacks: a URL or header section too large for the rules but small enough to
parse gets a JSON 414/431.

``render_config`` and ``error_files`` are pure; ``start`` writes them into a directory, checks them with
``haproxy -c`` and runs ``haproxy -db`` as a child process. The operators' copy for KubeRay is
``cluster/haproxy.cfg`` with ``cluster/haproxy-errors/`` (``cluster_files``; regenerate with
``python -m festival_serve.ops.manifests front-proxy``; tests/test_cluster.py fails while they differ).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, model_validator

from festival_serve.pipeline.settings import IngressSettings
from festival_serve.serving.http import BUDGET_HEADER, DISCONNECT_DISABLED_HEADER, REQUEST_ID

logger = logging.getLogger(__name__)

HAPROXY_INSTALL = "install Debian's haproxy: apt-get install haproxy"
CONFIG_NAME = "haproxy.cfg"
#: Beside the config; the config names its error files relative to its own directory (``default-path config``).
ERRORS_DIR = "haproxy-errors"
#: HAProxy keeps this much of every buffer for header rewrites (``tune.maxrewrite``'s default): a request head
#: must fit in ``tune.bufsize`` less this.
MAX_REWRITE_BYTES = 1024
#: The statuses HAProxy 2.6 takes in an ``http-errors`` section; rules give the others (414, 431) by naming a file.
HTTP_ERRORS_STATUSES = frozenset({400, 401, 403, 404, 405, 407, 408, 410, 413, 425, 429, 500, 501, 502, 503, 504})

#: On a KubeRay pod: HAProxy takes the port that clients and KubeRay's probes know (8000, Serve's default), and
#: Serve's proxy moves to the pod's loopback, one port up, where only the pod's own containers reach it.
CLUSTER_LISTEN_PORT = 8000
CLUSTER_SERVE_PORT = 8001


class FrontProxySettings(BaseModel):
    """The front proxy's addresses and limits. Defaults suit cameras posting a few frames a second each to a
    service whose requests last at most ``max_budget_s``; ``for_ingress`` takes the two limits the ingress
    owns (budget, body size) from its settings, so that they have one home."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen_host: str = Field("0.0.0.0", description="Where clients connect (every interface by default).")
    listen_port: int = Field(8000, ge=1, le=65535)
    backend_host: str = Field("127.0.0.1", description="Serve's HTTP proxy: on loopback, so only HAProxy reaches it.")
    backend_port: int = Field(8001, ge=1, le=65535)

    # -- timeouts, seconds --
    header_timeout_s: float = Field(
        5.0, gt=0, description="A request's line and headers, and its body or the first buffer of it "
        "(`option http-buffer-request`), must all arrive within this (`timeout http-request`): a camera's arrive in "
        "milliseconds, so 5 s cuts slow-header and slow-body clients and no real one. The rest of a large body has "
        "its own deadline in the ingress (ingress.body_read_max_s, 5 s).")
    client_timeout_s: float = Field(
        10.0, gt=0, description="Longest silence from a client while it sends its body or reads the answer "
        "(`timeout client`): twice the ingress's whole-body deadline, so the ingress, which answers slow bodies "
        "in JSON, cuts them first.")
    keep_alive_timeout_s: float = Field(
        2.0, gt=0, description="How long an idle keep-alive connection waits for its next request "
        "(`timeout http-keep-alive`): a camera's next frame comes well within it; an idle connection holds a slot.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Connecting to Serve's proxy on this host (`timeout connect`).")
    max_budget_s: float = Field(
        30.0, gt=0, description="The ingress's max_budget_s: x-request-timeout-seconds is clamped to it here, "
        "because Serve's proxy takes that header as its own request timeout.")
    answer_grace_s: float = Field(
        5.0, gt=0, description="Added to max_budget_s for `timeout server`: the ingress answers within the budget, "
        "so HAProxy's 504 only comes when Serve is stuck.")

    # -- the request head --
    buffer_bytes: int = Field(
        16384, ge=4096, description="`tune.bufsize`, HAProxy's default: a request line and headers over it less "
        f"{MAX_REWRITE_BYTES} bytes are refused (400) after reading that much, never more. Up to two buffers per "
        "connection.")
    max_url_bytes: int = Field(2048, ge=64, description="Longest request target (414); the API's are under 40 bytes.")
    max_header_bytes: int = Field(
        8192, ge=512, description="Largest header section (431): browsers send under 2 KB, an API key is 50 bytes.")
    max_headers: int = Field(64, ge=16, description="Most header lines (`tune.http.maxhdr`; beyond it a 400).")
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="The ingress's max_body_bytes: a larger declared content-length is "
        "refused (413) before a byte of the body travels; chunked bodies are cut by the ingress as they stream.")

    # -- connections and rates --
    max_connections: int = Field(
        4000, ge=16, description="Connections open at once, in all (`maxconn`); more wait in the kernel's backlog. "
        "At two 16 KB buffers each, at most ~128 MB of HAProxy's memory.")
    client_connections: int = Field(
        32, ge=1, description="Connections open at once from one address beyond which a request gets a 429: "
        "a camera needs one or two; 32 leaves room for many behind one NAT.")
    client_connections_hard: int = Field(
        64, ge=1, description="Connections open at once from one address beyond which a new one is closed at "
        "once, without an answer: connections that never finish a request (slow headers) never meet the 429 rule.")
    client_requests: int = Field(
        200, ge=1, description="Requests from one address per rate_window_s beyond which each gets a 429 "
        "(20/s over 10 s: several cameras behind one NAT; one client past it would take a large share of a GPU "
        "node). A load test from one machine needs more, or Serve's own port.")
    rate_window_s: int = Field(10, ge=1, description="The window of client_requests, seconds; its 429 says retry after it.")
    rate_tarpit_s: float = Field(
        1.0, gt=0, description="How long a request over client_requests is held before its 429 (`timeout tarpit`): "
        "a client that ignores Retry-After and floods is slowed to one request per connection per this, at the "
        "cost of an open connection (within client_connections).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of the 503 (no Serve proxy ready) and of the "
                               "connection-cap 429, whole seconds.")

    # -- the process --
    health_interval_s: float = Field(2.0, gt=0, description="How often HAProxy asks Serve's /healthz (3 misses: down).")
    threads: int = Field(2, ge=1, description="HAProxy threads: each forwards thousands of requests a second; "
                         "Serve's proxy is the limit long before.")

    @model_validator(mode="after")
    def _limits_fit(self) -> "FrontProxySettings":
        if self.client_connections_hard < self.client_connections:
            raise ValueError(f"client_connections_hard ({self.client_connections_hard}) is under client_connections "
                             f"({self.client_connections})")
        if self.client_connections_hard > self.max_connections:
            raise ValueError("client_connections_hard is over max_connections")
        head = self.max_url_bytes + self.max_header_bytes + MAX_REWRITE_BYTES
        if head >= self.buffer_bytes:
            # Otherwise a request that the 414/431 rules would refuse in JSON never parses: a bare 400 instead.
            raise ValueError(f"max_url_bytes + max_header_bytes + {MAX_REWRITE_BYTES} ({head}) must be under "
                             f"buffer_bytes ({self.buffer_bytes})")
        return self

    @property
    def server_timeout_s(self) -> float:
        return self.max_budget_s + self.answer_grace_s

    @classmethod
    def for_ingress(cls, ingress: IngressSettings, **options) -> "FrontProxySettings":
        """Settings whose budget clamp and body limit are the ingress's."""
        return cls(max_budget_s=ingress.max_budget_s, max_body_bytes=ingress.max_body_bytes, **options)


# -- the answers HAProxy gives itself ----------------------------------------------------------------------------

_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout", 413: "Payload Too Large",
            414: "URI Too Long", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


@dataclass(frozen=True)
class ErrorAnswer:
    """One answer HAProxy gives itself, kept in ``<name>.http``."""

    name: str
    status: int
    code: str
    message: str
    retry_after_s: int | None = None

    def http(self) -> str:
        """The whole HTTP response, as HAProxy's ``errorfile`` takes it (LF line ends: HAProxy parses the file and
        sends CRLFs; LF keeps the file the same through git and in a ConfigMap)."""
        body = json.dumps({"error": {"code": self.code, "message": self.message}})
        headers = [f"HTTP/1.1 {self.status} {_REASONS[self.status]}", "content-type: application/json",
                   f"content-length: {len(body.encode())}", "cache-control: no-store", "connection: close"]
        if self.retry_after_s is not None:
            headers.append(f"retry-after: {self.retry_after_s}")
        return "\n".join(headers) + "\n\n" + body


def error_answers(s: FrontProxySettings) -> tuple[ErrorAnswer, ...]:
    """Every answer HAProxy may give itself. Those named by their status alone form the ``http-errors`` section
    (the answer for that status, whatever gave it; 414 and 431 only where a rule names them); the others are named
    by the rules that give them."""
    return (
        ErrorAnswer("400", 400, "bad_request", "the request is malformed, or its request line and headers are over "
                    f"{s.buffer_bytes - MAX_REWRITE_BYTES} bytes"),
        ErrorAnswer("400-budget", 400, "invalid_budget", f"{BUDGET_HEADER} must be one positive number of seconds "
                    f"in digits with an optional fraction, e.g. 2.5 (at most {s.max_budget_s:g} is used)"),
        ErrorAnswer("403", 403, "forbidden", "the front proxy refused the request"),
        ErrorAnswer("404", 404, "not_found", "not served through the front proxy"),
        ErrorAnswer("408", 408, "request_timeout", f"the request did not arrive in time: its headers and the first "
                    f"{s.buffer_bytes // 1024} KB of its body within {s.header_timeout_s:g} s, the rest without a "
                    f"pause over {s.client_timeout_s:g} s"),
        ErrorAnswer("413", 413, "payload_too_large", f"the declared body is over {s.max_body_bytes} bytes"),
        ErrorAnswer("414", 414, "uri_too_long", f"the request target is over {s.max_url_bytes} bytes"),
        ErrorAnswer("429", 429, "rate_limited", f"more than {s.client_requests} requests in {s.rate_window_s} s "
                    "from one address", retry_after_s=s.rate_window_s),
        ErrorAnswer("429-connections", 429, "too_many_connections", f"more than {s.client_connections} connections "
                    "open from one address; reuse or close some", retry_after_s=s.retry_after_s),
        ErrorAnswer("431", 431, "headers_too_large", f"the request's headers are over {s.max_header_bytes} bytes"),
        ErrorAnswer("500", 500, "internal", "internal error in the front proxy"),
        ErrorAnswer("501", 501, "not_implemented", "the front proxy does not support this request's framing"),
        ErrorAnswer("502", 502, "bad_gateway", "Serve's HTTP proxy gave no valid answer"),
        ErrorAnswer("503", 503, "unavailable", "no Serve HTTP proxy is ready behind the front proxy; retry shortly",
                    retry_after_s=s.retry_after_s),
        ErrorAnswer("504", 504, "gateway_timeout", f"no answer from Serve within {s.server_timeout_s:g} s"),
    )


def error_files(settings: FrontProxySettings) -> dict[str, str]:
    """``<name>.http`` → the full HTTP response, for ``ERRORS_DIR`` beside the config."""
    return {f"{answer.name}.http": answer.http() for answer in error_answers(settings)}


# -- the config ---------------------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    """A HAProxy time, in whole milliseconds."""
    return f"{round(seconds * 1000)}ms"


def _error(name: str) -> str:
    return f"{ERRORS_DIR}/{name}.http"


def render_config(s: FrontProxySettings, *, source: str = "festival_serve/ops/front_proxy.py") -> str:
    """The HAProxy (>= 2.6) config for ``s``; its error files (``error_files``) go in ``ERRORS_DIR`` beside it."""
    per_status = sorted((a for a in error_answers(s) if a.name == str(a.status) and a.status in HTTP_ERRORS_STATUSES),
                        key=lambda a: a.status)
    budget, budget_cap = BUDGET_HEADER, math.ceil(s.max_budget_s)  # the ingress clamps what lies in between
    lines = [
        f"# GENERATED by festival_serve/ops/front_proxy.py from {source}. Do not edit by hand.",
        "# HAProxy in front of Ray Serve's HTTP proxy; what each limit is for: FrontProxySettings.",
        "global",
        f"    maxconn {s.max_connections}",
        f"    nbthread {s.threads}",
        "    # Error files are named relative to this file's directory, wherever it is mounted.",
        "    default-path config",
        f"    tune.bufsize {s.buffer_bytes}",
        f"    tune.http.maxhdr {s.max_headers}",
        "    # On a soft stop (SIGUSR1) requests in flight keep their whole budget before the process exits.",
        f"    hard-stop-after {_ms(s.server_timeout_s + s.answer_grace_s)}",
        "    log stdout format raw local0 info",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    # A line per refusal, timeout or error; none per normal request (thousands a second at a festival).",
        "    option dontlog-normal",
        f"    timeout http-request {_ms(s.header_timeout_s)}",
        f"    timeout client {_ms(s.client_timeout_s)}",
        "    timeout client-fin 1s",
        f"    timeout http-keep-alive {_ms(s.keep_alive_timeout_s)}",
        f"    timeout connect {_ms(s.connect_timeout_s)}",
        f"    timeout server {_ms(s.server_timeout_s)}",
        f"    timeout check {_ms(s.connect_timeout_s)}",
        f"    timeout tarpit {_ms(s.rate_tarpit_s)}",
        "    errorfiles festival",
        "",
        "http-errors festival",
        *(f"    errorfile {a.status} {_error(a.name)}" for a in per_status),
        "",
        "frontend public",
        f"    bind {s.listen_host}:{s.listen_port}",
        f"    maxconn {s.max_connections}",
        "    # Per client address (IPv4 kept mapped into IPv6): connections open now, requests in the window.",
        f"    stick-table type ipv6 size 100k expire {s.rate_window_s}s "
        f"store conn_cur,http_req_rate({s.rate_window_s}s)",
        "    tcp-request connection track-sc0 src",
        f"    tcp-request connection reject if {{ sc_conn_cur(0) gt {s.client_connections_hard} }}",
        f"    http-request deny deny_status 429 errorfile {_error('429-connections')} "
        f"if {{ sc_conn_cur(0) gt {s.client_connections} }}",
        "    # Over the rate: the 429 comes after rate_tarpit_s, so a client posting back to back slows to a request",
        "    # per connection per tarpit, and its refusals stop costing this machine's CPU (connections, answers).",
        f"    http-request tarpit deny_status 429 errorfile {_error('429')} "
        f"if {{ sc_http_req_rate(0) gt {s.client_requests} }}",
        f"    http-request deny deny_status 414 errorfile {_error('414')} if {{ url,length gt {s.max_url_bytes} }}",
        f"    http-request deny deny_status 431 errorfile {_error('431')} "
        f"if {{ req.hdrs,length gt {s.max_header_bytes} }}",
        f"    http-request deny deny_status 413 errorfile {_error('413')} "
        f"if {{ req.hdr(content-length) -m int gt {s.max_body_bytes} }}",
        "    # Serve sees a request only once its body is in, or the first buffer of it (a frame's first 16 KB), within",
        "    # the header timeout: a body trickled a byte a second never reaches Serve's proxy, where each chunk is a",
        "    # Ray call from the ingress, and ends here in a 408. (After the refusals above, which need no body.)",
        f"    http-request wait-for-body time {_ms(s.header_timeout_s)} at-least {s.buffer_bytes - MAX_REWRITE_BYTES}",
        "    # Serve's own paths: its proxy's health (KubeRay probes it) is served, its route table is not.",
        f"    http-request deny deny_status 404 errorfile {_error('404')} if {{ path_beg /-/ }} !{{ path /-/healthz }}",
        "    # Serve's proxy obeys these two headers. With the first a client would switch off the cancelling of its",
        "    # request when it leaves; the second is Serve's own request timeout (<= 0: none) and the ingress's budget.",
        f"    http-request del-header {DISCONNECT_DISABLED_HEADER}",
        f"    acl budget_given req.fhdr_cnt({budget}) gt 0",
        f"    acl budget_plain req.fhdr({budget}) -m reg '^[0-9]{{1,9}}([.][0-9]{{1,9}})?$'",
        f"    http-request deny deny_status 400 errorfile {_error('400-budget')} "
        f"if {{ req.fhdr_cnt({budget}) gt 1 }} || budget_given !budget_plain",
        f"    http-request set-header {budget} {s.max_budget_s:g} "
        f"if budget_given {{ req.fhdr({budget}),field(1,.) -m int ge {budget_cap} }}",
        "    # Serve logs the request id and answers with it: only a sane one passes (festival_serve.serving.http).",
        f"    acl request_id_sane req.fhdr(x-request-id) -m reg '^{REQUEST_ID.pattern}$'",
        "    http-request del-header x-request-id if { req.fhdr_cnt(x-request-id) gt 1 } || !request_id_sane",
        "    # The client's address as HAProxy saw it, never one the client wrote.",
        "    http-request del-header x-forwarded-for",
        "    option forwardfor",
        "    default_backend serve",
        "",
        "backend serve",
        "    option httpchk",
        "    http-check send meth GET uri /healthz ver HTTP/1.1 hdr host localhost",
        "    http-check expect status 200",
        f"    server serve {s.backend_host}:{s.backend_port} check inter {_ms(s.health_interval_s)} fall 3 rise 2",
    ]
    return "\n".join(lines) + "\n"


def protections(s: FrontProxySettings) -> list[str]:
    """What the front proxy enforces, a line each (``festival-serve up --public`` prints them)."""
    return [
        f"headers and a body's first {s.buffer_bytes // 1024} KB within {s.header_timeout_s:g} s (else 408), before "
        f"Serve sees the request; no pause over {s.client_timeout_s:g} s while a body arrives or an answer is read",
        f"request target <= {s.max_url_bytes} B (414), headers <= {s.max_header_bytes} B (431) and "
        f"{s.max_headers} lines, declared body <= {s.max_body_bytes} B (413)",
        f"{s.max_connections} connections in all; per address {s.client_connections} open (429), "
        f"{s.client_connections_hard} (closed at once), {s.client_requests} requests per {s.rate_window_s} s (429)",
        f"{DISCONNECT_DISABLED_HEADER} dropped, {BUDGET_HEADER} clamped to {s.max_budget_s:g} s, an x-request-id "
        "that is not a sane id dropped, Serve's /-/ paths but /-/healthz refused",
        f"Serve's /healthz checked every {s.health_interval_s:g} s; no ready Serve proxy: a JSON 503",
    ]


# -- the operators' copy ----------------------------------------------------------------------------------------

def cluster_settings(serve_config: dict) -> FrontProxySettings:
    """The KubeRay sidecar's settings: HAProxy on every interface at CLUSTER_LISTEN_PORT, Serve's proxy on the
    pod's loopback at CLUSTER_SERVE_PORT, the ingress's limits from the config's first application."""
    ingress = IngressSettings.model_validate((serve_config["applications"][0].get("args") or {}).get("ingress") or {})
    return FrontProxySettings.for_ingress(ingress, listen_host="0.0.0.0", listen_port=CLUSTER_LISTEN_PORT,
                                          backend_host="127.0.0.1", backend_port=CLUSTER_SERVE_PORT)


def rendered_files(settings: FrontProxySettings, *, source: str) -> dict[str, str]:
    """Relative path → text: the config and its error files, as they lie in one directory."""
    return {CONFIG_NAME: render_config(settings, source=source),
            **{f"{ERRORS_DIR}/{name}": text for name, text in error_files(settings).items()}}


def cluster_files(serve_config: dict, source: str = "serve_config.yaml") -> dict[str, str]:
    """``cluster/haproxy.cfg`` and ``cluster/haproxy-errors/*`` as committed (paths relative to ``cluster/``)."""
    return rendered_files(cluster_settings(serve_config), source=source)


def write_files(files: dict[str, str], directory: Path) -> Path:
    """Write ``files`` under ``directory``, removing error files that are no longer rendered; the config's path."""
    errors = directory / ERRORS_DIR
    errors.mkdir(parents=True, exist_ok=True)
    for stale in errors.glob("*.http"):
        if f"{ERRORS_DIR}/{stale.name}" not in files:
            stale.unlink()
    for relative, text in files.items():
        (directory / relative).write_text(text)
    return directory / CONFIG_NAME


# -- the process ----------------------------------------------------------------------------------------------

class FrontProxyError(RuntimeError):
    """HAProxy is missing, refuses the config, or did not start."""


#: Where Debian's package and the official image install HAProxy, for a PATH without the sbin directories.
HAPROXY_PLACES = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")


def haproxy_binary() -> str:
    """The ``haproxy`` executable: on PATH, else in one of ``HAPROXY_PLACES``."""
    found = shutil.which("haproxy") or next((p for p in HAPROXY_PLACES if Path(p).is_file()), None)
    if found is None:
        raise FrontProxyError(f"haproxy not found; {HAPROXY_INSTALL}")
    return found


def haproxy_version(binary: str | None = None) -> tuple[int, int]:
    """(major, minor) of the installed HAProxy."""
    out = subprocess.run([binary or haproxy_binary(), "-v"], capture_output=True, text=True, check=True).stdout
    major, minor = out.split("version ", 1)[1].split(".")[:2]
    return int(major), int(minor)


def check_config(path: Path, binary: str | None = None) -> None:
    """``haproxy -c``: raise with HAProxy's own words when it refuses the config."""
    result = subprocess.run([binary or haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise FrontProxyError(f"haproxy refuses {path}:\n{(result.stdout + result.stderr).strip()}")


@dataclass
class FrontProxy:
    """A running HAProxy child process."""

    process: subprocess.Popen
    config_path: Path
    settings: FrontProxySettings

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop it now (SIGTERM; SIGKILL after ``timeout_s``): requests still in flight are cut."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(settings: FrontProxySettings, directory: Path, *, log: IO | None = None, ready_timeout_s: float = 10.0,
          source: str = "festival-serve up --public") -> FrontProxy:
    """Write the config and its error files into ``directory``, check them, and run ``haproxy -db`` (in the
    foreground, its log on stdout, or on ``log``) until it accepts connections. Raises ``FrontProxyError`` when
    HAProxy is missing, refuses the config, exits (its port is taken) or does not listen within ``ready_timeout_s``."""
    binary = haproxy_binary()
    path = write_files(rendered_files(settings, source=source), directory)
    check_config(path, binary)
    if _listening(settings.listen_host, settings.listen_port):
        raise FrontProxyError(f"{settings.listen_host}:{settings.listen_port} is taken; pass a free port")
    process = subprocess.Popen([binary, "-db", "-f", str(path)], stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT if log is not None else None)
    proxy = FrontProxy(process, path, settings)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FrontProxyError(f"haproxy exited with status {process.returncode} as it started (is "
                                  f"{settings.listen_host}:{settings.listen_port} taken?)")
        if not _listening(settings.listen_host, settings.listen_port):
            time.sleep(0.05)
            continue
        logger.info("front proxy: haproxy (pid %d) on %s:%d -> %s:%d", process.pid, settings.listen_host,
                    settings.listen_port, settings.backend_host, settings.backend_port)
        return proxy
    proxy.stop()
    raise FrontProxyError(f"haproxy did not listen on {settings.listen_host}:{settings.listen_port} "
                          f"within {ready_timeout_s:g} s")


def _listening(host: str, port: int) -> bool:
    """Whether something listens on ``host:port``: binding it fails (a connection to find out would be logged by
    HAProxy as a bad request)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def stop(proxy: FrontProxy | None) -> None:
    """Stop ``proxy`` if there is one (``FrontProxy.stop``)."""
    if proxy is not None:
        proxy.stop()


def ingress_protections(ingress: IngressSettings) -> list[str]:
    """What the ingress behind the front proxy enforces itself, a line each."""
    keys = "API keys on /v1" if ingress.api_keys_file else "no API keys: /v1 is open"
    return [
        f"body within {ingress.body_read_max_s:g} s (408) and <= {ingress.max_body_bytes} B while it streams (413), "
        f"<= {ingress.max_bodies_in_flight} bodies arriving at once (503)",
        f"images <= {ingress.max_image_pixels} pixels (400), admission by queue and budget (503 + Retry-After), "
        f"budgets <= {ingress.max_budget_s:g} s",
        f"{keys}; /healthz, /readyz and /v1/models <= {ingress.probe_rate_per_s:g}/s (429)",
    ]
