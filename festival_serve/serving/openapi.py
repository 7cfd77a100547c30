"""The HTTP API described as OpenAPI 3.1, served at ``GET /openapi.json`` by both servers
(``festival_serve.serving.http.build_http_app``).

The answers' schemas are pydantic models of the JSON the flow builds (``festival_serve.serving.flow``); the
``degraded`` codes are ``flow.DegradedCode`` itself, so the document cannot list a code the flow does not
send. The error statuses and codes are ``ERRORS``, the table the README shows. No Ray, no Starlette.
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any, Iterable, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from typing_extensions import NotRequired, TypedDict

from festival_serve.pipeline.types import DegradedCode
from festival_serve.serving.imaging import IMAGE_CONTENT_TYPES
from festival_serve.pipeline.stages import STAGE_NAMES

Box = Annotated[list[float], Field(min_length=4, max_length=4,
                                   description="[x1, y1, x2, y2] in the original image's pixels")]


class ImageSize(BaseModel):
    width: int = Field(description="Pixels, after the EXIF orientation is applied.")
    height: int


class Sign(BaseModel):
    box: Box
    label: str = Field(description="The sign's class.")
    score: float = Field(description="The detector's confidence, 0-1.")
    text: str | None = Field(description="What the sign says; null when it was not read or its class prints no text.")
    text_score: float | None = Field(description="The reader's confidence, 0-1; null with text.")


class HazardLabel(BaseModel):
    label: str
    score: float = Field(description="0-1.")


class Hazard(BaseModel):
    cell: int = Field(description="The cell's index in the hazard layout.")
    box: Box
    labels: list[HazardLabel]


class Degraded(BaseModel):
    """A stage that did not fully contribute to the answer, and why."""

    stage: str = Field(json_schema_extra={"enum": list(STAGE_NAMES)})
    code: DegradedCode
    message: str = Field(description="Short, for people; never file paths or exception text.")


class Analysis(BaseModel):
    request_id: str = Field(description="The request's x-request-id when it sent one, else a new id.")
    image: ImageSize
    signs: list[Sign]
    hazards: list[Hazard]
    description: str | None = Field(description="The scene in words; null with describe=false or when the "
                                                "describer did not answer (then `degraded` says why).")
    timings_ms: dict[str, float] = Field(description="Milliseconds: decode, each stage called, and total.")
    degraded: list[Degraded] = Field(description="Empty when every stage contributed.")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # backend, device, precision, weights, batch settings, …

    name: str = Field(json_schema_extra={"enum": list(STAGE_NAMES)})
    ready: bool
    unavailable_reason: str | None = None


class Models(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]


class StageReadiness(BaseModel):
    ready: bool
    required: bool = Field(description="Listed in ingress.required_stages.")
    reason: str | None = Field(description="Why it is not ready; null when it is.")


class Readiness(BaseModel):
    ready: bool
    stages: dict[str, StageReadiness]
    age_s: float | None = Field(None, description="Seconds since the stages were last asked: the ingress asks them "
                                "in the background every ingress.probe_refresh_s, never per probe.")


class ErrorDetail(TypedDict):
    code: Annotated[str, Field(description="Stable and machine-readable: see the status's description.")]
    message: Annotated[str, Field(description="Short, for people; never file paths or exception text.")]


class Error(TypedDict):
    error: ErrorDetail
    request_id: NotRequired[Annotated[str, Field(description="Absent on 404 and 405.")]]


class ErrorCase(NamedTuple):
    status: int
    code: str
    when: str


#: Every error a client can get, as the README's table lists them.
ERRORS: tuple[ErrorCase, ...] = (
    ErrorCase(400, "empty_body", "no bytes"),
    ErrorCase(400, "invalid_image", "bytes that are not a decodable JPEG/PNG/WebP, or an image over "
                                    "`ingress.max_image_pixels`"),
    ErrorCase(400, "invalid_form", "a malformed multipart body"),
    ErrorCase(400, "missing_image", "a multipart body without an `image` file field"),
    ErrorCase(400, "invalid_parameter", "e.g. `describe=maybe`"),
    ErrorCase(400, "invalid_budget", "`x-request-timeout-seconds` is not a positive number"),
    ErrorCase(401, "unauthorized", "no valid `Authorization: Bearer <key>` where API keys are on"),
    ErrorCase(404, "not_found", "an unknown route"),
    ErrorCase(405, "method_not_allowed", "a method the route does not take"),
    ErrorCase(408, "body_timeout", "the body did not arrive within the budget or `ingress.body_read_max_s`"),
    ErrorCase(408, "decode_timeout", "the image could not be decoded within the request's budget"),
    ErrorCase(413, "payload_too_large", "a body over `ingress.max_body_bytes` (multipart is cut off while it streams)"),
    ErrorCase(415, "unsupported_media_type", "any content type but the image types and multipart/form-data"),
    ErrorCase(500, "internal", "a bug: the message says only that; the server log has the details"),
    ErrorCase(429, "rate_limited", "`/healthz`, `/readyz` and `/v1/models` polled faster than "
                                   "`ingress.probe_rate_per_s`"),
    ErrorCase(503, "overloaded", "the safety stages' queues cannot answer within the budget, or one of them is full, "
                                 "or too many bodies (or bytes of them) are arriving or pixels decoding at once, or "
                                 "a huge frame comes while the large lane is taken"),
    ErrorCase(503, "safety_stages_unavailable", "neither the sign detector nor the hazard cells could analyse "
                                                "the frame"),
)

_SCHEMAS = {"Analysis": Analysis, "Models": Models, "Health": Health, "Readiness": Readiness, "Error": Error}
_RETRY_AFTER = {"description": "Whole seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}}
_CHALLENGE = {"description": "`Bearer`, or `Bearer error=\"invalid_token\"` for a key that is not valid.",
              "schema": {"type": "string"}}


def openapi_document(*, budget_header: str, open_paths: Iterable[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document. ``budget_header``: the request's budget header; ``open_paths``: the paths
    that need no API key (``festival_serve.serving.auth.OPEN_PATHS``); every other operation needs one."""
    operations = {
        "/v1/analyze": {"post": _analyze(budget_header)},
        "/v1/models": {"get": {
            "summary": "The models behind each stage: backend, device, precision, weights, batch settings.",
            "operationId": "listModels",
            "responses": {"200": _json("Every stage's model.", "Models"), **_errors(401, 429, 500)},
        }},
        "/healthz": {"get": {
            "summary": "The server process is alive.", "operationId": "healthz",
            "responses": {"200": _json("Alive.", "Health"), **_errors(429)},
        }},
        "/readyz": {"get": {
            "summary": "Every stage in ingress.required_stages has its model loaded.", "operationId": "readyz",
            "responses": {"200": _json("Ready.", "Readiness"),
                          "503": _json("Not ready: `stages` says which stage is not, and why.", "Readiness"),
                          "429": _errors(429)["429"]},
        }},
        "/openapi.json": {"get": {
            "summary": "This document.", "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}},
        }},
    }
    opened = set(open_paths)
    for path, methods in operations.items():
        for operation in methods.values():
            if path in opened:
                operation["security"] = []  # no key needed, even where keys are on
            operation["responses"]["default"] = _json(_describe(c for c in ERRORS if c.status in (404, 405)), "Error")
    try:
        version = metadata.version("festival-serve")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    return {
        "openapi": "3.1.0",
        "info": {"title": "festival-serve", "version": version,
                 "description": "Road-safety analysis of camera frames: signs (and what they say), hazards, "
                                "and a description of the scene."},
        "paths": operations,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key from `festival-serve keys new`, where the server has a keys file "
                               "(`ingress.api_keys_file`); without one, every path is open.",
            }},
        },
        "security": [{"bearer": []}],
    }


def _analyze(budget_header: str) -> dict:
    image = {"type": "string", "format": "binary"}
    body = {ct: {"schema": image} for ct in IMAGE_CONTENT_TYPES}
    body["multipart/form-data"] = {
        "schema": {"type": "object", "required": ["image"],
                   "properties": {"image": {**image, "description": "The frame, as a file field."}}},
        "encoding": {"image": {"contentType": ", ".join(IMAGE_CONTENT_TYPES)}},
    }
    return {
        "summary": "Find the signs (and read them), the hazards, and describe the scene of one frame.",
        "operationId": "analyze",
        "parameters": [
            {"name": "describe", "in": "query", "schema": {"type": "boolean", "default": True},
             "description": "Describe the scene (the slowest stage). Also 1/0, yes/no, on/off."},
            {"name": budget_header, "in": "header", "schema": {"type": "number", "exclusiveMinimum": 0},
             "description": "The request's time budget in seconds, clamped to ingress.max_budget_s; without it, "
                            "ingress.default_budget_s. Stages that would not answer within it are cut off or "
                            "skipped, and `degraded` says so."},
            {"name": "x-request-id", "in": "header", "schema": {"type": "string"},
             "description": "The request's id, answered as request_id: at most 128 of A-Z a-z 0-9 . _ : - (else, "
                            "or when it has other characters, a new one)."},
        ],
        "requestBody": {"required": True, "content": body,
                        "description": "One frame: the image's bytes, or a multipart form with a file field `image`."},
        "responses": {
            "200": {**_json("The analysis; `degraded` lists the stages that did not fully contribute.", "Analysis"),
                    "headers": {"x-request-id": {"schema": {"type": "string"}, "description": "= request_id"}}},
            **_errors(400, 401, 405, 408, 413, 415, 500, 503),
        },
    }


def _errors(*statuses: int) -> dict:
    responses = {}
    for status in statuses:
        response = _json(_describe(case for case in ERRORS if case.status == status), "Error")
        if status == 401:
            response["headers"] = {"WWW-Authenticate": _CHALLENGE}
        if status in (429, 503):
            response["headers"] = {"Retry-After": _RETRY_AFTER}
        if status == 503:
            response["description"] += (" Ray Serve answers 503 with Retry-After too (not this JSON) when every "
                                        "ingress replica's queue is full.")
        responses[str(status)] = response
    return responses


def _describe(cases: Iterable[ErrorCase]) -> str:
    return "; ".join(f"{case.status} `{case.code}`: {case.when}" for case in cases) + "."


def _json(description: str, schema: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _schemas() -> dict:
    inputs = [(name, "serialization", TypeAdapter(model)) for name, model in _SCHEMAS.items()]
    refs, defs = TypeAdapter.json_schemas(inputs, ref_template="#/components/schemas/{model}")
    top = {name: refs[(name, "serialization")] for name in _SCHEMAS}
    # A top-level model comes back as a $ref into the definitions: name it by its own name there.
    return {**defs.get("$defs", {}), **{name: schema for name, schema in top.items() if "$ref" not in schema}}
