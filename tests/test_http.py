"""One HTTP layer for both servers (``festival_serve.serving.http.build_http_app``): one route table, one error mapper
that turns whatever an endpoint raises into its status and JSON (logged once, with the request id), and
``GET /openapi.json``, which describes what the servers really send. The Serve ingress is checked here
without Ray: its class builds the same app, and none of the requests below get as far as ``ray.put``."""

from __future__ import annotations

import io
import json
import logging
import typing

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from festival_serve.serving import auth
from festival_serve.serving import flow
from festival_serve.serving.errors import ApiError
from festival_serve.serving.http import ApiHandlers, build_http_app, request_id_of
from festival_serve.measure.baseline import build_app
from festival_serve.serving.imaging import InvalidImage, encode_jpeg
from festival_serve.serving.openapi import ERRORS
from festival_serve.pipeline.settings import IngressSettings, PipelineArgs
from festival_serve.pipeline.stages import STAGES


def app_raising(exc: Exception, seen: list[str] | None = None) -> TestClient:
    """An app whose analyze raises ``exc``, after noting the request id it was given (in ``seen``)."""
    async def analyze(request: Request) -> JSONResponse:
        if seen is not None:
            seen.append(request_id_of(request))
        raise exc

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return TestClient(build_http_app(ApiHandlers(analyze=analyze, models=ok, healthz=ok, readyz=ok), keys=None))


# -- one error mapper ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc, status, code, message", [
    (ApiError(413, "payload_too_large", "body is over the limit"), 413, "payload_too_large", "body is over the limit"),
    (InvalidImage("not a decodable JPEG, PNG or WebP image"), 400, "invalid_image",
     "not a decodable JPEG, PNG or WebP image"),
    (flow.Rejected(503, "overloaded", "the queues are full", 2.5), 503, "overloaded", "the queues are full"),
])
def test_a_client_error_keeps_its_status_code_and_message(exc, status, code, message):
    reply = app_raising(exc).post("/v1/analyze", headers={"x-request-id": "frame-7"})

    assert reply.status_code == status
    assert reply.json() == {"error": {"code": code, "message": message}, "request_id": "frame-7"}


def test_a_refusal_says_when_to_retry_in_whole_seconds():
    reply = app_raising(flow.Rejected(503, "overloaded", "full", 2.5)).post("/v1/analyze")

    assert reply.status_code == 503 and reply.headers["retry-after"] == "3"


def test_a_bug_is_a_500_without_its_text_logged_once_with_the_request_id_the_handler_had(caplog):
    seen: list[str] = []
    client = app_raising(RuntimeError("/srv/models/secret.pt is corrupt"), seen)

    with caplog.at_level(logging.INFO, logger="festival_serve.serving.http"):
        reply = client.post("/v1/analyze")  # no x-request-id: the mapper answers with the handler's new id

    assert reply.status_code == 500
    assert reply.json() == {"error": {"code": "internal", "message": "internal error; the server log has the details"},
                            "request_id": seen[0]}
    assert "secret" not in reply.text
    logged = [r for r in caplog.records if r.name == "festival_serve.serving.http"]
    assert len(logged) == 1 and seen[0] in logged[0].getMessage() and logged[0].exc_info


def test_unknown_routes_and_methods_are_404_and_405_as_before():
    client = app_raising(RuntimeError())

    assert client.get("/v1/nothing").json() == {"error": {"code": "not_found", "message": "Not Found"}}
    reply = client.get("/v1/analyze")
    assert reply.status_code == 405 and reply.json()["error"]["code"] == "method_not_allowed"
    assert reply.headers["allow"] == "POST"


# -- the ingress and the baseline answer alike --------------------------------------------------------------


class Handle:
    """Stands in for a DeploymentHandle: the requests here are refused before any stage is called."""

    deployment_name = "stand-in"

    def __getattr__(self, method: str):
        return self

    def remote(self, *args):
        raise AssertionError("no request here should reach a stage")


def ingress_app(settings: IngressSettings):
    from deployments.ingress import PipelineIngress

    # Serve wraps the class (its __init__ becomes a coroutine Serve awaits); build the app as a replica would.
    cls = PipelineIngress.func_or_class.__mro__[1]
    assert cls.__name__ == "PipelineIngress"
    ingress = cls.__new__(cls)
    cls.__init__(ingress, settings, **{stage.name: Handle() for stage in STAGES})
    return ingress.__serve_build_asgi_app__()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


BAD_REQUESTS = {
    "no body": ("post", "/v1/analyze", {"content": b"", "headers": {"content-type": "image/jpeg"}}),
    "gif as jpeg": ("post", "/v1/analyze", {"content": gif(), "headers": {"content-type": "image/jpeg"}}),
    "text body": ("post", "/v1/analyze", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    "too large": ("post", "/v1/analyze", {"content": b"\xff" * 4096, "headers": {"content-type": "image/jpeg"}}),
    "describe=maybe": ("post", "/v1/analyze?describe=maybe",
                       {"content": encode_jpeg(np.zeros((8, 8, 3), np.uint8)), "headers": {"content-type": "image/jpeg"}}),
    "bad budget": ("post", "/v1/analyze", {"content": b"x", "headers": {"x-request-timeout-seconds": "soon"}}),
    "no form image": ("post", "/v1/analyze", {"content": b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                                              "headers": {"content-type": "multipart/form-data; boundary=b"}}),
    "unknown route": ("get", "/v1/nothing", {}),
    "wrong method": ("put", "/v1/models", {}),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_the_ingress_and_the_baseline_refuse_a_bad_request_with_the_same_answer(name):
    settings = IngressSettings(max_body_bytes=1024)
    ingress = TestClient(ingress_app(settings))
    baseline = TestClient(build_app(PipelineArgs(ingress=settings), models={}))
    method, path, options = BAD_REQUESTS[name]
    options = {**options, "headers": {**options.get("headers", {}), "x-request-id": "same-id"}}

    answers = [getattr(client, method)(path, **options) for client in (ingress, baseline)]

    assert answers[0].status_code == answers[1].status_code >= 400
    assert answers[0].json() == answers[1].json()


def test_both_servers_serve_the_same_open_api_document_with_and_without_keys(tmp_path):
    key = auth.new_key()
    (tmp_path / "keys").write_text(auth.digest(key) + "\n")
    settings = IngressSettings(api_keys_file=str(tmp_path / "keys"))
    ingress = TestClient(ingress_app(settings))
    baseline = TestClient(build_app(PipelineArgs(ingress=settings), models={}))

    documents = [client.get("/openapi.json") for client in (ingress, baseline)]

    assert [d.status_code for d in documents] == [200, 200]  # open, as the probes are
    assert documents[0].json() == documents[1].json()
    assert baseline.get("/v1/models").status_code == 401  # the rest is still closed


# -- /openapi.json ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict:
    reply = TestClient(build_app(PipelineArgs(), models={})).get("/openapi.json")
    assert reply.headers["content-type"] == "application/json"
    return json.loads(reply.text)


def test_the_document_lists_every_path_with_its_method(document):
    assert document["openapi"].startswith("3.1")
    assert {path: set(methods) for path, methods in document["paths"].items()} == {
        "/v1/analyze": {"post"}, "/v1/models": {"get"}, "/healthz": {"get"}, "/readyz": {"get"},
        "/openapi.json": {"get"}}


def test_analyze_documents_its_inputs(document):
    analyze = document["paths"]["/v1/analyze"]["post"]
    parameters = {(p["in"], p["name"]) for p in analyze["parameters"]}
    assert {("query", "describe"), ("header", "x-request-timeout-seconds")} <= parameters
    assert set(analyze["requestBody"]["content"]) == {"image/jpeg", "image/png", "image/webp", "multipart/form-data"}
    assert analyze["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["image"]


def test_analyze_documents_every_status_of_the_error_table(document):
    responses = document["paths"]["/v1/analyze"]["post"]["responses"]
    assert {"200", "400", "401", "405", "413", "415", "500", "503"} <= set(responses)
    assert "Retry-After" in responses["503"]["headers"] and "WWW-Authenticate" in responses["401"]["headers"]
    described = json.dumps(document["paths"])
    for case in ERRORS:  # 404 is in every operation's default answer
        assert f"`{case.code}`" in described, case


def test_the_degraded_codes_are_the_flows_own(document):
    degraded = document["components"]["schemas"]["Degraded"]
    assert degraded["required"] == ["stage", "code", "message"]
    assert degraded["properties"]["code"]["enum"] == list(typing.get_args(flow.DegradedCode))


def test_only_the_probes_and_the_document_are_open(document):
    assert document["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"] == {**document["components"]["securitySchemes"]["bearer"],
                                                                  "type": "http", "scheme": "bearer"}
    open_paths = {path for path, methods in document["paths"].items()
                  if all(op.get("security") == [] for op in methods.values())}
    assert open_paths == {"/healthz", "/readyz", "/openapi.json"}


def test_every_reference_resolves(document):
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            refs.update([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert refs and all(ref.startswith("#/components/schemas/") for ref in refs)
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= set(document["components"]["schemas"])


class Finds:
    """Every stage's stand-in: one speed-limit sign (with text), one flagged cell, a reader that fails, a describer."""

    def detect(self, frames):
        from festival_serve.pipeline.types import SignDetection

        return [[SignDetection(box=(1.0, 2.0, 9.0, 12.0), label="speed_limit", class_id=0, score=0.9, has_text=True)]
                for _ in frames]

    def classify(self, frames):
        from festival_serve.pipeline.types import HazardCell, HazardLabel

        return [[HazardCell(cell=3, box=(0.0, 0.0, 8.0, 8.0), labels=(HazardLabel("TrafficCone", 0.8),))]
                for _ in frames]

    def read(self, crops):
        raise RuntimeError("the reader is broken")

    def describe(self, images, findings):
        return ["a road with a cone"] * len(images)


def test_a_real_answer_and_a_real_error_match_their_schemas(document):
    jsonschema = pytest.importorskip("jsonschema")
    models = dict.fromkeys(["sign_detector", "hazard_cells", "sign_reader", "scene_describer"], Finds())
    client = TestClient(build_app(PipelineArgs(), models=models))
    image = encode_jpeg(np.zeros((16, 16, 3), np.uint8))

    answer = client.post("/v1/analyze?describe=true", content=image, headers={"content-type": "image/jpeg"})
    error = client.post("/v1/analyze", content=b"", headers={"content-type": "image/png"})

    def check(body, schema):
        jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema}", **document}).validate(body)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["signs"] and body["hazards"] and body["description"] == "a road with a cone"
    assert body["degraded"] == [{"stage": "sign_reader", "code": "error", "message": "the stage failed on this frame"}]
    check(answer.json(), "Analysis")
    check(error.json(), "Error")
    check(client.get("/readyz").json(), "Health")
