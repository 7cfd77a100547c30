"""The four stages of the pipeline, in one table that every command reads.

A *stage* is one model deployment: its name (the key in answers, metrics, ``/v1/models`` and the
settings), its section of ``PipelineArgs``, its Serve deployment and batched method, its loader
(the plain model class the deployment, the baseline, ``validate`` and the bench all build), the
weights it reads, the kind of answer it gives (what ``validate`` compares two runs' answers by), and the
*networks* it runs that can be exported to ONNX and compiled to TensorRT engines (the reader's and the
describer's networks are not: they ship as ONNX / run in transformers).

No Ray import, no import of the settings (they read this table to check stage names), and the model modules
are imported only when a loader or network source is called, so reading the table is cheap (the CLI, the
local profile and the bench read it without torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable



def _attr(path: str) -> Any:
    """``"module:attribute"`` → the attribute, importing the module now."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Network:
    """A network of a stage that ``engines build``, ``prepare`` (ONNX export) and ``validate`` handle."""

    name: str  # e.g. "sign_classifier"; the key in reports and engine build output
    stage: str  # the stage whose settings (backend, device, fp16) it runs under
    #: settings section → its weights setting (a path relative to the model store), or None when off.
    weights: Callable[[Any], str | None]
    #: (weights path, settings section) → a ``NetworkSource`` (``festival_serve.runtime.backends``).
    make_source: Callable[[Path, Any], Any]
    #: (settings section, (H, W, 3) uint8 RGB frames, sign boxes per frame) → the network's input batch
    #: ((N, C, H, W) float32) as serving preprocesses it; ``validate`` feeds it to every backend.
    batch: Callable[[Any, list, list], Any]
    unit: str  # what one item of that batch is ("images", "crops"), for speed tables

    def source(self, args: Any) -> Any | None:
        """The network source for ``args`` (``PipelineArgs``), or None when the network is switched off."""
        settings = getattr(args, self.stage)
        weights = self.weights(settings)
        return None if weights is None else self.make_source(args.store_path(weights), settings)


@dataclass(frozen=True)
class Stage:
    name: str  # the key in answers, settings (``PipelineArgs.<name>``), metrics and /v1/models
    deployment: str  # the Ray Serve deployment's name
    method: str  # the deployment method the ingress calls (batched, or handing over to the batched one)
    loader: str  # "module:callable" taking (settings, *, model_store, gpu_only, gpu_fraction)
    #: Exceptions that mean "weights absent": the deployment stays up, answers degraded, says why.
    missing: tuple[str, ...]
    #: settings section → the weights it reads (None: bundled with a package), for ``models status``.
    weights: Callable[[Any], str | None]
    #: settings section → the runtime it runs on (a key of ``festival_serve.runtime.preflight.RUNTIMES``, or "auto").
    runtime: Callable[[Any], str]
    networks: tuple[Network, ...] = ()
    #: A safety stage: a frame it did not look at is no answer (the ingress refuses it with 503).
    safety: bool = False
    #: Must be able to serve for /readyz to say 200 (``ingress.required_stages`` defaults to these).
    required: bool = False
    #: What kind of answer the stage gives, for comparing two runs' answers on the same scenes ("detections":
    #: ``SignDetection``s per frame, "cells": ``HazardCell``s per frame): a key of
    #: ``festival_serve.ops.parity.AGREEMENTS``, for ``validate``'s task-level parity; None where validate
    #: compares the stage its own way (the reader, against ground-truth text) or not at all.
    agreement: str | None = None
    #: What one item of the stage's batches is: "frames", or "crops" for a stage batched by crop count; names
    #: its batch-size histogram (``festival_serve.serving.metrics``).
    batch_unit: str = "frames"

    def settings(self, args: Any) -> Any:
        """This stage's section of ``args`` (``PipelineArgs``)."""
        return getattr(args, self.name)

    def load(self, settings: Any, *, model_store: str | Path, gpu_only: bool = False,
             gpu_fraction: float | None = None) -> Any:
        """Preflight, then build the stage's model (loads weights and warms up)."""
        self.preflight(settings, gpu_only=gpu_only)
        return _attr(self.loader)(settings, model_store=Path(model_store), gpu_only=gpu_only,
                                  gpu_fraction=gpu_fraction)

    def preflight(self, settings: Any, *, gpu_only: bool = False) -> str:
        """The device the stage resolves to, after checking the runtime it needs there is installed."""
        from festival_serve.runtime.devices import resolve_device
        from festival_serve.runtime.preflight import require_runtime

        device = resolve_device(settings.device, gpu_only=gpu_only, model=self.name)
        require_runtime(self.name, self.runtime(settings), device)
        return device

    def missing_errors(self) -> tuple[type[Exception], ...]:
        return tuple(_attr(path) for path in self.missing)


def _yolo(path: Path, settings) -> Any:
    return _attr("festival_serve.models.sign_detector.detector:YoloCheckpoint")(path, settings.image_size)


def _stream_weights(settings) -> str | None:
    """The detector's weights again when camera-stream frames have a letterbox size of their own, else None."""
    return settings.weights if settings.stream_size != settings.image_size else None


def _yolo_streams(path: Path, settings) -> Any:
    return _attr("festival_serve.models.sign_detector.detector:YoloCheckpoint")(path, settings.stream_size)


def _detector_stream_batch(settings, frames: list, sign_boxes: list) -> Any:
    return _attr("festival_serve.models.sign_detector.detector:letterbox_batch")(frames, settings.stream_size)[0]


def _classifier(path: Path, settings) -> Any:
    return _attr("festival_serve.models.sign_detector.classifier:ClassifierCheckpoint")(path, settings.classifier_image_size)


def _yolic(path: Path, settings) -> Any:
    layout = _attr("festival_serve.models.hazard_cells.yolic:load_layout")(settings.layout)
    return _attr("festival_serve.models.hazard_cells.yolic:YolicNetwork")(path, layout)


def _detector_batch(settings, frames: list, sign_boxes: list) -> Any:
    return _attr("festival_serve.models.sign_detector.detector:letterbox_batch")(frames, settings.image_size)[0]


def _classifier_batch(settings, frames: list, sign_boxes: list) -> Any:
    """Crops around the given sign boxes, cut as the served classifier cuts around detections."""
    square_crop = _attr("festival_serve.models.sign_detector.classifier:square_crop")
    crops = [square_crop(frame, box, settings.classifier_context) for frame, boxes in zip(frames, sign_boxes)
             for box in boxes]
    return _attr("festival_serve.models.sign_detector.classifier:preprocess_crops")(crops, settings.classifier_image_size)


def _yolic_batch(settings, frames: list, sign_boxes: list) -> Any:
    return _attr("festival_serve.models.hazard_cells.yolic:preprocess_batch")(frames)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="sign_detector", deployment="SignDetector", method="detect",
        loader="festival_serve.models.sign_detector.detector:SignDetector", missing=("builtins:FileNotFoundError",),
        weights=lambda s: s.weights, runtime=lambda s: s.backend,
        networks=(
            Network("sign_detector", "sign_detector", lambda s: s.weights, _yolo, _detector_batch, "images"),
            # The same weights at camera-stream frames' letterbox size (stream_image_size), when it differs.
            Network("sign_detector_streams", "sign_detector", _stream_weights, _yolo_streams, _detector_stream_batch,
                    "images"),
            # Runs where its detector runs (same backend, device and precision settings).
            Network("sign_classifier", "sign_detector", lambda s: s.classifier, _classifier, _classifier_batch,
                    "crops"),
        ),
        agreement="detections", safety=True, required=True,
    ),
    Stage(
        name="hazard_cells", deployment="HazardCells", method="classify",
        loader="festival_serve.models.hazard_cells.yolic:HazardCellClassifier", missing=("builtins:FileNotFoundError",),
        weights=lambda s: s.weights, runtime=lambda s: s.backend,
        networks=(Network("hazard_cells", "hazard_cells", lambda s: s.weights, _yolic, _yolic_batch, "images"),),
        agreement="cells", safety=True, required=True,
    ),
    Stage(
        name="sign_reader", deployment="SignReader", method="read",
        loader="festival_serve.models.sign_reader.reader:create_reader", missing=("builtins:FileNotFoundError",),
        weights=lambda s: s.rec_model, runtime=lambda s: {"onnx": "onnxruntime"}.get(s.engine, s.engine),
        required=True, batch_unit="crops",
    ),
    Stage(
        name="scene_describer", deployment="SceneDescriber", method="describe",
        loader="festival_serve.models.scene_describer.describer:SceneDescriber", missing=("festival_serve.models.scene_describer.describer:WeightsMissing",),
        weights=lambda s: s.model, runtime=lambda s: "torch",
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
NETWORKS: tuple[Network, ...] = tuple(network for stage in STAGES for network in stage.networks)
SAFETY_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.safety)


def stage(name: str) -> Stage:
    """The stage called ``name``; an unknown name is an error listing the stages."""
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
