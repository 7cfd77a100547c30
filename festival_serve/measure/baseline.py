"""The benchmark baseline: the seed app's way of serving, behind the same HTTP API as the graph.

One process, every model preloaded, each request run through the models one after another
(decode → signs → hazards → OCR per crop → VLM), one request at a time, on a single-worker ASGI
server (uvicorn). Same model modules, settings and backends as the Serve graph; the event loop stays
free to accept connections while a request runs on the one model thread.

    python -m festival_serve.measure.baseline --args args.json --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from festival_serve.serving.admission import Budget
from festival_serve.serving.http import BUDGET_HEADER, ApiHandlers, build_http_app, ms_since, parse_bool, parse_budget, \
    request_id_of
from festival_serve.serving.auth import KeyRing
from festival_serve.serving.flow import analyze_frame
from festival_serve.pipeline.types import Ticket
from festival_serve.serving.imaging import Decoder
from festival_serve.serving.public_paths import public_model_info
from festival_serve.serving.uploads import read_image_bytes
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import STAGE_NAMES, STAGES, Stage

logger = logging.getLogger(__name__)


def load_models(args: PipelineArgs) -> dict[str, Any]:
    """Every model, loaded now, through the same loaders the deployments use (the stage table's)."""
    models = {}
    for stage in STAGES:
        started = time.perf_counter()
        models[stage.name] = stage.load(stage.settings(args), model_store=args.model_store, gpu_only=args.gpu_only)
        logger.info("baseline: %s loaded in %.1f s", stage.name, time.perf_counter() - started)
    return models


class SequentialPipeline:
    """Runs one request at a time through the models, each model call one image (or one crop)."""

    def __init__(self, args: PipelineArgs, models: dict[str, Any]) -> None:
        self.args, self.models = args, models
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")
        self.decoder = Decoder(args.ingress)  # as the ingress does
        self.one_at_a_time = asyncio.Lock()
        self.batch_sizes = {stage: collections.Counter() for stage in STAGE_NAMES}  # always 1: no batching here
        self.stages = {stage.name: self._one_item_call(stage) for stage in STAGES}
        self.stages["sign_reader"] = self._read_each  # the seed read a frame's crops one by one

    def _one_item_call(self, stage: Stage) -> Callable[..., Any]:
        """The stage's batched method (the same name on the model as on its deployment) on a batch of one.
        The model is looked up per call: a caller may leave out a stage it never calls (the describer)."""
        def call(*item_and_ticket):
            method = getattr(self.models[stage.name], stage.method)
            item = item_and_ticket[:-1]  # the seed had no queues at its models: the ticket is not needed
            return self._call(stage.name, lambda: method(*[[part] for part in item])[0])

        return call

    async def _call(self, stage: str, work: Callable[[], Any]) -> Any:
        self.batch_sizes[stage][1] += 1
        return await asyncio.get_running_loop().run_in_executor(self.worker, work)

    async def _read_each(self, crops: list, ticket: Ticket) -> list:
        reader = self.models["sign_reader"]
        return [await self._call("sign_reader", lambda c=c: reader.read([c])[0]) for c in crops]

    async def analyze(self, data: bytes, describe: bool, budget: Budget, request_id: str) -> tuple[dict, dict]:
        """One request at a time, as the seed served: no admission control, but the same budget on every wait."""
        async with self.one_at_a_time:
            started = time.perf_counter()
            decoded = await self.decoder.decode(data, deadline=budget.started + budget.seconds
                                                - self.args.ingress.answer_margin_s)  # as the ingress does
            timings = {"decode": ms_since(started)}
            result = await analyze_frame(decoded.pixels, decoded.pixels, describe, self.stages, self.args.ingress,
                                         timings, budget=budget, request_id=request_id,
                                         original_size=decoded.original_size)
            return result, timings

    def info(self) -> list[dict]:
        return [{"name": stage, "ready": True, **public_model_info(self.models[stage].model_info(), self.args.model_store),
                 "batch": {"max_batch_size": 1, "observed_sizes": dict(self.batch_sizes[stage])}}
                for stage in STAGE_NAMES]


def build_app(args: PipelineArgs, models: dict[str, Any] | None = None) -> Starlette:
    # Before the models load: a bad keys file fails in a moment, not after a minute of loading.
    keys = KeyRing.from_file(args.ingress.api_keys_file) if args.ingress.api_keys_file else None
    pipeline = SequentialPipeline(args, models if models is not None else load_models(args))

    async def analyze(request: Request) -> JSONResponse:
        request_id = request_id_of(request)
        started = time.perf_counter()
        budget = Budget(parse_budget(request.headers.get(BUDGET_HEADER), args.ingress))
        describe = parse_bool(request.query_params.get("describe", "true"), "describe")
        data = await read_image_bytes(request, args.ingress.max_body_bytes)
        result, timings = await pipeline.analyze(data, describe, budget, request_id)
        timings["total"] = ms_since(started)
        return JSONResponse({"request_id": request_id, **result, "timings_ms": timings},
                            headers={"x-request-id": request_id})

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"models": pipeline.info()})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    # readyz is healthz: every model is loaded before the server starts.
    return build_http_app(ApiHandlers(analyze=analyze, models=list_models, healthz=healthz, readyz=healthz), keys=keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m festival_serve.measure.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", type=Path, help="PipelineArgs as JSON (default: the built-in defaults)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--allow-network", action="store_true")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not options.allow_network:
        from festival_serve.runtime.offline import apply_offline_env, install_network_guard

        apply_offline_env()
        install_network_guard()
    import uvicorn

    args = PipelineArgs.model_validate(json.loads(options.args.read_text()) if options.args else {})
    app = build_app(args)
    uvicorn.run(app, host=options.host, port=options.port, workers=1, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
