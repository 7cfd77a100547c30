"""The bench's peer: the same models behind LitServe, served as a user might serve them instead of the graph.

One LitServe inference worker holds every model (the stage table's loaders, the same settings as the graph and
the baseline). LitServe batches up to ``max_batch_size`` requests, waiting at most ``batch_timeout_s`` for a
batch to fill, and the worker runs each model once per batch: one detector call and one hazard-cell call over
the batch's frames, one reader call over the crops of every sign that prints text, one describer call over the
frames asked to be described. The answer is the graph's JSON (``flow.sign_json``, ``hazard_json``,
``findings_of``); what the peer does not have is the graph's budgets, admission control and degraded answers.

The HTTP API is LitServe's: ``POST /v1/analyze`` with a multipart body (file part ``image``, field
``describe``), ``/readyz``; plus ``/v1/models`` for the bench. No Ray import.

    python -m festival_serve.measure.bench.peer --args args.json --port 8703
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException

from festival_serve.serving.errors import ApiError
from festival_serve.serving.http import parse_bool
from festival_serve.serving.flow import findings_of, hazard_json, sign_json, signs_with_text
from festival_serve.serving.imaging import InvalidImage, crop, decode_image
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import STAGE_NAMES

logger = logging.getLogger(__name__)

#: LitServe's batching knobs as the issue's peer set them: up to 16 frames, waiting at most 10 ms for more.
MAX_BATCH_SIZE = 16
BATCH_TIMEOUT_S = 0.01


class PipelineAPI(ls.LitAPI):
    """decode_request (per request, in the worker) → predict (the batch, one call per model) → the JSON answer."""

    def __init__(self, args: PipelineArgs, *, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout_s: float = BATCH_TIMEOUT_S) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path="/v1/analyze")
        self.args = args
        self.models: dict[str, Any] = {}

    def setup(self, device: str) -> None:
        from festival_serve.measure.baseline import load_models

        self.models = load_models(self.args)

    def decode_request(self, request) -> tuple[Any, bool]:
        upload = request.get("image")
        if upload is None or not hasattr(upload, "file"):
            raise HTTPException(400, "send the image as the multipart file part named 'image'")
        try:
            image = decode_image(upload.file.read(), max_pixels=self.args.ingress.max_image_pixels)
            return image, parse_bool(str(request.get("describe", "true")), "describe")
        except (InvalidImage, ApiError) as e:
            raise HTTPException(400, str(e)) from None

    def predict(self, batch: list[tuple[Any, bool]]) -> list[dict]:
        started = time.perf_counter()
        images = [image for image, _ in batch]
        signs = self.models["sign_detector"].detect(images)
        hazards = self.models["hazard_cells"].classify(images)
        texts = self._read(images, signs)
        described = [i for i, (_, describe) in enumerate(batch) if describe]
        descriptions: dict[int, Any] = {}
        if described:
            findings = [findings_of(signs[i], texts[i], hazards[i], (images[i].shape[1], images[i].shape[0]))
                        for i in described]
            said = self.models["scene_describer"].describe([images[i] for i in described], findings)
            descriptions = dict(zip(described, said))
        total_ms = round((time.perf_counter() - started) * 1000, 2)
        return [{"image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
                 "signs": [sign_json(s, t) for s, t in zip(signs[i], texts[i])],
                 "hazards": [hazard_json(h) for h in hazards[i]],
                 "description": descriptions.get(i), "degraded": [],
                 "timings_ms": {"batch": len(batch), "models": total_ms}}
                for i, image in enumerate(images)]

    def _read(self, images: list, signs: list[list]) -> list[list]:
        """One reader call over the crops of every frame's text signs (surest first, up to max_signs_read)."""
        ingress = self.args.ingress
        texts: list[list] = [[None] * len(found) for found in signs]
        wanted = []  # (frame, sign) of each crop, in the reader call's order
        for f, found in enumerate(signs):
            wanted += [(f, k) for k in signs_with_text(found)[: ingress.max_signs_read]]
        if wanted:
            read = self.models["sign_reader"].read([crop(images[f], signs[f][k].box, ingress.crop_padding)
                                                    for f, k in wanted])
            for (f, k), text in zip(wanted, read):
                texts[f][k] = text
        return texts

    def encode_response(self, output: dict) -> dict:
        return output


def build_server(args: PipelineArgs, *, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout_s: float = BATCH_TIMEOUT_S, timeout_s: float = 600) -> ls.LitServer:
    """The LitServe server with one CPU inference worker; ``/readyz`` is LitServe's health check (ready once
    the worker has loaded every model) and ``/v1/models`` lists the stages for the bench."""
    server = ls.LitServer(PipelineAPI(args, max_batch_size=max_batch_size, batch_timeout_s=batch_timeout_s),
                          accelerator="cpu", workers_per_device=1, timeout=timeout_s, healthcheck_path="/readyz")

    async def list_models() -> dict:
        return {"models": [{"name": stage, "ready": True, "batch": {"max_batch_size": max_batch_size}}
                           for stage in STAGE_NAMES]}

    server.app.add_api_route("/v1/models", list_models, methods=["GET"])
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", type=Path, required=True, help="PipelineArgs JSON (as the baseline takes)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8703)
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT_S, help="seconds")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = PipelineArgs.model_validate_json(options.args.read_text())
    server = build_server(args, max_batch_size=options.max_batch_size, batch_timeout_s=options.batch_timeout)
    server.run(host=options.host, port=options.port, generate_client_file=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
