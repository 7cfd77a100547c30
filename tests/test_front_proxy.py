"""The front proxy (``festival_serve.ops.front_proxy``) through a real HAProxy: in front of a small server of the
project's own HTTP app (``build_http_app``, with an endpoint that echoes the headers it was given), and once in
front of real Ray Serve (HAProxy → Serve's proxy → the ingress). Slow and malformed clients are raw sockets.

Each test speaks from its own loopback address (127.0.0.N), so the per-address caps of one never touch another.
Tests that run HAProxy skip, saying why, where it is not installed (``.ci/run`` installs Debian's).

HAProxy 2.6 to 3.2 answer the few errors their HTTP/1 layer gives before a request exists (headers too slow, a
request head over ``tune.bufsize``) with their built-in HTML, not the error files (fixed in 3.3, upstream commit
d252ec2be): those tests check the status and that the connection ends, and the JSON where the HAProxy gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse

from festival_serve import DATA_DIR
from festival_serve.ops import front_proxy, up
from festival_serve.pipeline.settings import IngressSettings
from festival_serve.serving.errors import ApiError
from festival_serve.serving.http import ApiHandlers, build_http_app

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]

try:
    HAPROXY_VERSION = front_proxy.haproxy_version()
except front_proxy.FrontProxyError:
    HAPROXY_VERSION = None
needs_haproxy = pytest.mark.skipif(HAPROXY_VERSION is None,
                                   reason=f"haproxy is not installed ({front_proxy.HAPROXY_INSTALL}; .ci/run does)")
#: Whether this HAProxy answers its HTTP/1 layer's early errors (slow headers, an oversized head) with the error files.
EARLY_ERRORS_IN_JSON = HAPROXY_VERSION is not None and HAPROXY_VERSION >= (3, 3)

#: Small enough to run into within a test: a second for the headers, 4/8 connections and 20 requests per address.
TEST_LIMITS = dict(header_timeout_s=1.0, client_connections=4, client_connections_hard=8, client_requests=20,
                   health_interval_s=0.5, rate_tarpit_s=0.5)
_addresses = itertools.count(10)


def new_client_address() -> str:
    """A loopback address no other test has spoken from."""
    n = next(_addresses)
    return f"127.0.{n // 250}.{n % 250 + 2}"


# -- a server of the project's HTTP app, and HAProxy in front of it ---------------------------------------------

class EchoServer:
    """``build_http_app`` with an analyze endpoint that answers the headers it was given (``x-test-sleep-s``: first
    wait that long), run by uvicorn on a thread."""

    def __init__(self) -> None:
        self.requests_seen = 0  # answered, body and all
        self.requests_started = 0  # that reached the app at all
        self.port = free_port()

        async def analyze(request: Request) -> JSONResponse:
            self.requests_started += 1
            if request.headers.get("content-type") != "image/jpeg":
                raise ApiError(415, "unsupported_media_type", "send image/jpeg")
            await asyncio.sleep(float(request.headers.get("x-test-sleep-s", 0)))
            body = await request.body()
            self.requests_seen += 1
            return JSONResponse({"headers": request.headers.items(), "body_bytes": len(body)})

        async def models(request: Request) -> JSONResponse:
            return JSONResponse({"models": []})

        async def healthz(request: Request) -> JSONResponse:
            return JSONResponse({"status": "ok"})

        app = build_http_app(ApiHandlers(analyze=analyze, models=models, healthz=healthz, readyz=healthz), keys=None)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "EchoServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the echo server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def running(directory: Path, **settings):
    """HAProxy on a free loopback port with ``settings``; yields its ``FrontProxy``."""
    options = {"listen_host": "127.0.0.1", "listen_port": free_port(), **settings}
    with open(directory / "haproxy.log", "w") as log:
        proxy = front_proxy.start(front_proxy.FrontProxySettings(**options), directory, log=log)
        try:
            yield proxy
        finally:
            proxy.stop()


@pytest.fixture(scope="module")
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def front(echo, tmp_path_factory):
    """HAProxy in front of the echo server, with ``TEST_LIMITS``."""
    with running(tmp_path_factory.mktemp("front-proxy"), backend_port=echo.port, **TEST_LIMITS) as proxy:
        yield proxy


def url_of(proxy: front_proxy.FrontProxy) -> str:
    return f"http://127.0.0.1:{proxy.settings.listen_port}"


def client(source: str | None = None) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source or new_client_address()), timeout=30)


def analyze(base: str, headers: dict | None = None, *, body: bytes = b"\xff\xd8" * 500, source: str | None = None
            ) -> httpx.Response:
    with client(source) as http:
        return http.post(f"{base}/v1/analyze", content=body, headers={"content-type": "image/jpeg", **(headers or {})})


def echoed(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the server behind the proxy was given, by name."""
    assert response.status_code == 200, response.text
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name, []).append(value)
    return seen


def connect(proxy: front_proxy.FrontProxy, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.settings.listen_port), timeout=10, source_address=(source, 0))
    sock.settimeout(10)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after the answer ends it too)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def json_error(status: int, headers: dict[str, str], body: bytes) -> str:
    """The error code of an answer in the service's contract; fails on anything else."""
    assert headers["content-type"] == "application/json", (status, headers, body[:200])
    document = json.loads(body)
    assert set(document) == {"error"} and set(document["error"]) == {"code", "message"}, document
    return document["error"]["code"]


def assert_early_error(raw: bytes, status: int, code: str) -> None:
    """An error HAProxy's HTTP/1 layer gives before a request exists: JSON where this HAProxy honours the error
    files there (>= 3.3), its built-in answer with the same status before that."""
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    if EARLY_ERRORS_IN_JSON:
        assert json_error(got, headers, body) == code
    else:
        assert headers["content-type"] == "text/html" and headers["connection"] == "close"


# -- the rendered files, without HAProxy ------------------------------------------------------------------------

def test_every_error_file_is_a_complete_http_answer_in_the_json_error_contract():
    settings = front_proxy.FrontProxySettings()
    files = front_proxy.error_files(settings)
    assert {"400.http", "408.http", "413.http", "414.http", "429.http", "431.http", "500.http", "502.http",
            "503.http", "504.http"} <= set(files)
    for name, text in files.items():
        head, _, body = text.partition("\n\n")
        status_line, *lines = head.split("\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        status = int(status_line.split()[1])
        assert name.startswith(str(status))
        assert int(headers["content-length"]) == len(body.encode())
        assert headers["connection"] == "close"
        json_error(status, headers, body.encode())
        assert ("retry-after" in headers) == (status in (429, 503)), name


def test_the_readme_lists_every_answer_the_front_proxy_gives_itself():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("HAProxy answers some requests"):]
    table = table[:table.index("\n\n", table.index("| status |"))]
    for answer in front_proxy.error_answers(front_proxy.FrontProxySettings()):
        assert f"`{answer.code}`" in table and str(answer.status) in table, answer


def test_limits_that_would_turn_a_json_refusal_into_a_bare_400_are_refused():
    with pytest.raises(ValueError, match="must be under buffer_bytes"):
        front_proxy.FrontProxySettings(max_header_bytes=15000)
    with pytest.raises(ValueError, match="client_connections_hard"):
        front_proxy.FrontProxySettings(client_connections=10, client_connections_hard=5)


def test_the_budget_clamp_and_body_limit_are_the_ingresss():
    settings = front_proxy.FrontProxySettings.for_ingress(IngressSettings(max_budget_s=12, default_budget_s=5,
                                                                          max_body_bytes=2048))
    assert (settings.max_budget_s, settings.max_body_bytes, settings.server_timeout_s) == (12, 2048, 17)
    cluster = front_proxy.cluster_settings(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    assert (cluster.listen_host, cluster.listen_port) == ("0.0.0.0", front_proxy.CLUSTER_LISTEN_PORT)
    assert (cluster.backend_host, cluster.backend_port) == ("127.0.0.1", front_proxy.CLUSTER_SERVE_PORT)


@needs_haproxy
def test_haproxy_accepts_the_committed_operators_config():
    front_proxy.check_config(ROOT / "cluster" / front_proxy.CONFIG_NAME)


def test_a_missing_haproxy_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(front_proxy.shutil, "which", lambda name: None)
    monkeypatch.setattr(front_proxy, "HAPROXY_PLACES", ())
    with pytest.raises(front_proxy.FrontProxyError, match="apt-get install haproxy"):
        front_proxy.start(front_proxy.FrontProxySettings(), tmp_path)


# -- through HAProxy in front of the app --------------------------------------------------------------------------

@needs_haproxy
def test_a_normal_request_passes_with_its_answer_and_status_unchanged(front, echo):
    base = url_of(front)
    reply = analyze(base)
    assert reply.status_code == 200 and reply.json()["body_bytes"] == 1000
    with client() as http:
        assert http.get(f"{base}/v1/models").json() == {"models": []}
        refused = http.post(f"{base}/v1/analyze", content=b"x", headers={"content-type": "text/plain"})
    # The app's own refusal passes as the app gave it: HAProxy's error files are for its own answers only.
    assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type"


@needs_haproxy
def test_the_headers_serves_proxy_obeys_are_stripped_or_clamped(front):
    base = url_of(front)
    seen = echoed(analyze(base, {"x-request-disconnect-disabled": "?1", "x-request-timeout-seconds": "1000000"}))
    assert "x-request-disconnect-disabled" not in seen
    assert seen["x-request-timeout-seconds"] == ["30"]  # the ingress's max_budget_s
    assert echoed(analyze(base, {"x-request-timeout-seconds": "2.5"}))["x-request-timeout-seconds"] == ["2.5"]
    assert echoed(analyze(base, {"x-request-timeout-seconds": "30.9"}))["x-request-timeout-seconds"] == ["30"]
    for unusable in ("1e9", "-1", "inf", "1_000", "5, 1000"):
        reply = analyze(base, {"x-request-timeout-seconds": unusable})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_budget", unusable


@needs_haproxy
def test_only_a_sane_request_id_reaches_the_server(front, echo):
    base = url_of(front)
    assert echoed(analyze(base, {"x-request-id": "cam-7.frame_0001:a"}))["x-request-id"] == ["cam-7.frame_0001:a"]
    for insane in ("a" * 129, "a b", "<script>", "x" * 4096):
        assert "x-request-id" not in echoed(analyze(base, {"x-request-id": insane})), insane[:20]
    # A megabyte of it is over the request head's limit: refused after 16 KB, never forwarded.
    before = echo.requests_seen
    source = new_client_address()
    sock = connect(front, source)
    with contextlib.suppress(OSError):  # HAProxy may close while the rest is still being sent
        sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 2\r\n"
                     b"x-request-id: " + b"a" * (1 << 20) + b"\r\n\r\nab")
    assert_early_error(read_answer(sock), 400, "bad_request")
    assert echo.requests_seen == before


@needs_haproxy
def test_a_client_that_writes_its_own_forwarded_for_gets_its_real_address(front):
    source = new_client_address()
    assert echoed(analyze(url_of(front), {"x-forwarded-for": "10.9.9.9"}, source=source))["x-forwarded-for"] == [source]


@needs_haproxy
def test_slow_headers_are_cut_off_at_the_header_timeout_with_a_408(front):
    sock = connect(front, new_client_address())
    started = time.monotonic()
    sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nhost: x\r\n")  # and then nothing
    raw = read_answer(sock)
    took = time.monotonic() - started
    assert_early_error(raw, 408, "request_timeout")
    assert TEST_LIMITS["header_timeout_s"] - 0.1 <= took <= TEST_LIMITS["header_timeout_s"] + 1.0, took
    silent = connect(front, new_client_address())  # a connection that never sends a byte ends as well
    started = time.monotonic()
    read_answer(silent)
    assert time.monotonic() - started <= TEST_LIMITS["header_timeout_s"] + 1.0


@needs_haproxy
def test_a_trickled_body_never_reaches_the_server_and_is_a_json_408_at_the_header_timeout(front, echo):
    before = echo.requests_started
    sock = connect(front, new_client_address())
    started = time.monotonic()
    sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 100000\r\n\r\n")
    answer = None
    for _ in range(int(TEST_LIMITS["header_timeout_s"] * 10) + 20):  # a byte every 0.1 s, until it is answered
        with contextlib.suppress(OSError):
            sock.sendall(b"x")
        sock.settimeout(0.1)
        try:
            answer = sock.recv(65536)
            break
        except TimeoutError:
            continue
    took = time.monotonic() - started
    sock.settimeout(5)
    got, headers, body = parse(answer + read_answer(sock))
    assert (got, json_error(got, headers, body)) == (408, "request_timeout")
    assert TEST_LIMITS["header_timeout_s"] - 0.1 <= took <= TEST_LIMITS["header_timeout_s"] + 1.0, took
    assert echo.requests_started == before  # Serve's proxy would have relayed every byte to the ingress
    # A body that comes at once passes, larger than HAProxy's buffer too.
    assert echoed(analyze(url_of(front), {}, source=new_client_address(), body=b"y" * 100_000)) is not None


@needs_haproxy
def test_a_long_url_is_a_json_414_and_a_large_header_section_a_json_431(front):
    for request, status, code in [
        (b"GET /v1/models?q=" + b"a" * 3000 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10_000 + b"\r\n\r\n", 431, "headers_too_large"),
    ]:
        sock = connect(front, new_client_address())
        sock.sendall(request)
        got, headers, body = parse(read_answer(sock))
        assert (got, json_error(got, headers, body)) == (status, code)


@needs_haproxy
@pytest.mark.parametrize("start, filler", [
    (b"GET /", b"a"),  # a 12 MB request target
    (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ", b"a"),  # a 48 MB header section
], ids=["12MB-url", "48MB-headers"])
def test_a_huge_request_head_is_refused_after_reading_a_buffer_of_it(front, start, filler):
    sock = connect(front, new_client_address())
    sock.settimeout(5)
    size = (12 if b"HTTP" not in start else 48) << 20
    sent, chunk = 0, start + filler * (64 * 1024 - len(start))
    try:
        while sent < size:
            sent += sock.send(chunk if sent == 0 else filler * 65536)
    except OSError:  # HAProxy answered and closed while the head was still coming
        pass
    assert sent < 4 << 20, f"HAProxy kept reading: {sent} bytes"
    assert_early_error(read_answer(sock), 400, "bad_request")


@needs_haproxy
def test_a_declared_body_over_the_ingress_limit_is_a_json_413_before_it_is_sent(front, echo):
    before = echo.requests_seen
    sock = connect(front, new_client_address())
    sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\n"
                 b"content-length: %d\r\n\r\n" % (front.settings.max_body_bytes + 1))
    got, headers, body = parse(read_answer(sock))
    assert (got, json_error(got, headers, body)) == (413, "payload_too_large")
    assert echo.requests_seen == before


@needs_haproxy
def test_connections_over_the_per_client_cap_get_a_json_429_and_over_the_hard_cap_are_closed(front):
    source = new_client_address()
    held = [connect(front, source) for _ in range(TEST_LIMITS["client_connections"])]
    time.sleep(0.2)  # accepted and counted
    extra = connect(front, source)
    extra.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
    got, headers, body = parse(read_answer(extra))
    assert (got, json_error(got, headers, body)) == (429, "too_many_connections")
    assert headers["retry-after"] == str(front.settings.retry_after_s)
    held += [connect(front, source) for _ in range(TEST_LIMITS["client_connections_hard"] - len(held))]
    time.sleep(0.2)
    started = time.monotonic()
    try:
        answer = read_answer(connect(front, source))
    except ConnectionResetError:  # the reset can come before connect() returns
        answer = b""
    assert answer == b"" and time.monotonic() - started < 0.5  # closed at once, without a word
    # Another address is not affected.
    assert analyze(url_of(front)).status_code == 200
    for sock in held:
        sock.close()


@needs_haproxy
def test_requests_over_the_per_client_rate_get_a_json_429_with_retry_after(front):
    source = new_client_address()
    with client(source) as http:
        answers = [http.get(f"{url_of(front)}/v1/models") for _ in range(TEST_LIMITS["client_requests"])]
        started = time.monotonic()
        over = http.get(f"{url_of(front)}/v1/models")
        held = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * TEST_LIMITS["client_requests"]
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
    assert over.headers["retry-after"] == str(front.settings.rate_window_s)
    # Held first (a flood slows to a request per connection per tarpit), never for long.
    assert front.settings.rate_tarpit_s - 0.1 <= held <= front.settings.rate_tarpit_s + 1.0, held


@needs_haproxy
def test_serves_own_paths_are_not_served_but_its_health(front):
    with client() as http:
        routes = http.get(f"{url_of(front)}/-/routes")
        health = http.get(f"{url_of(front)}/-/healthz")
    assert routes.status_code == 404 and routes.json()["error"]["message"] == "not served through the front proxy"
    assert health.status_code == 404 and health.json()["error"]["message"] == "Not Found"  # the app's own: it passed


@needs_haproxy
def test_a_backend_that_is_down_is_a_json_503_and_a_stuck_one_a_json_504(tmp_path, echo):
    with running(tmp_path, backend_port=free_port(), **TEST_LIMITS) as down:
        reply = analyze(url_of(down))
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "unavailable"
        assert reply.headers["retry-after"] == "1"
    slow = tmp_path / "slow"
    slow.mkdir()
    with running(slow, backend_port=echo.port, max_budget_s=1, answer_grace_s=0.5, **TEST_LIMITS) as stuck:
        assert echoed(analyze(url_of(stuck), {"x-request-timeout-seconds": "5"}))["x-request-timeout-seconds"] == ["1"]
        started = time.monotonic()
        reply = analyze(url_of(stuck), {"x-test-sleep-s": "3"})
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "gateway_timeout"
        assert time.monotonic() - started < 2.5


@needs_haproxy
def test_a_taken_port_is_refused_before_haproxy_starts(tmp_path, front):
    with pytest.raises(front_proxy.FrontProxyError, match="is taken"):
        front_proxy.start(front.settings, tmp_path)


# -- through real Ray Serve: HAProxy -> Serve's proxy -> the ingress ---------------------------------------------

@pytest.fixture(scope="module")
def serve_behind_front_proxy(tmp_path_factory):
    """The graph from serve_config.yaml with an empty model store (it answers, honestly degraded) on a loopback
    port, HAProxy in front of it as ``festival-serve up --public`` runs it. Yields (HAProxy's URL, Serve's URL)."""
    serve_port = free_port()
    config, _ = up.local_profile(up.load_config(ROOT / "serve_config.yaml"), host="127.0.0.1", port=serve_port,
                                 model_store=str(tmp_path_factory.mktemp("empty-store")), has_gpu=False, base_dir=ROOT)
    [app] = config["applications"]
    # The empty store lacks the trained recognizer: PP-OCRv6's own, shipped in the wheel, reads.
    app["args"]["sign_reader"].update(rec_model=None, rec_dict=None)
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    ingress = up.pipeline_args(config).ingress
    up.start(config, offline=True, num_cpus=2, metrics_port=free_port())
    try:
        up.wait_until_running(timeout_s=420, progress=lambda line: None)
        settings = dict(TEST_LIMITS, listen_host="127.0.0.1", listen_port=free_port(), backend_port=serve_port,
                        max_budget_s=ingress.max_budget_s, max_body_bytes=ingress.max_body_bytes)
        directory = tmp_path_factory.mktemp("front-proxy-serve")
        with running(directory, **settings) as proxy:
            yield url_of(proxy), f"http://127.0.0.1:{serve_port}"
    finally:
        up.stop()


@needs_haproxy
def test_through_real_serve_the_ingress_answers_reach_the_client_unchanged(serve_behind_front_proxy):
    front, serve = serve_behind_front_proxy
    scene = (DATA_DIR / "sample_scene.jpg").read_bytes()
    with client() as http:
        assert http.get(f"{front}/healthz").status_code == 200
        assert http.get(f"{front}/-/healthz").status_code == 200  # Serve's proxy's own: what KubeRay probes
    direct, proxied = analyze(serve, body=scene), analyze(front, body=scene)
    # No weights: the safety stages cannot run, and the ingress says so (503 + Retry-After), through HAProxy too.
    assert direct.status_code == proxied.status_code == 503
    assert direct.json()["error"]["code"] == proxied.json()["error"]["code"] == "safety_stages_unavailable"
    assert "retry-after" in proxied.headers


@needs_haproxy
def test_through_real_serve_an_insane_request_id_never_reaches_serves_proxy(serve_behind_front_proxy):
    front, serve = serve_behind_front_proxy
    insane = "a" * 200
    # Serve's proxy takes the client's id as the request's, logs it and answers with it; behind HAProxy it never
    # sees it, and makes its own.
    assert analyze(serve, {"x-request-id": insane}).headers["x-request-id"] == insane
    proxied = analyze(front, {"x-request-id": insane})
    assert proxied.headers["x-request-id"] != insane and len(proxied.headers["x-request-id"]) <= 128
    assert analyze(front, {"x-request-id": "cam-7"}).headers["x-request-id"] == "cam-7"


@needs_haproxy
def test_through_real_serve_slow_headers_are_cut_by_haproxy_where_serve_would_wait(serve_behind_front_proxy):
    front, serve = serve_behind_front_proxy
    partial = b"POST /v1/analyze HTTP/1.1\r\nhost: x\r\n"
    to_serve = socket.create_connection(("127.0.0.1", int(serve.rsplit(":", 1)[1])), timeout=10)
    to_front = socket.create_connection(("127.0.0.1", int(front.rsplit(":", 1)[1])), timeout=10,
                                        source_address=(new_client_address(), 0))
    for sock in (to_serve, to_front):
        sock.sendall(partial)
    assert_early_error(read_answer(to_front), 408, "request_timeout")
    to_serve.settimeout(1.0)
    with pytest.raises(TimeoutError):  # Serve's proxy alone is still waiting for the rest of the headers
        to_serve.recv(1)
    to_serve.close()

