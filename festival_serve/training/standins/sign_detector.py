"""Small, randomly initialised ultralytics YOLO checkpoints (a detector, a classifier), built offline for tests.

The network is ultralytics' bundled ``yolov8{scale}.yaml`` with its head sized for the given classes,
saved by ``Model.save`` — the format ultralytics writes for trained models (``{"model": fp16 module,
"ema": None, "date", "version", ...}``) — so it loads through ``YOLO(path)``, ``load_checkpoint`` and
``festival_serve.models.sign_detector.detector.YoloCheckpoint`` exactly as a real ``best.pt`` does.

A freshly initialised YOLO is useless as a test model: its activations shrink layer after layer to
zero, so every anchor gets the same box and the same score whatever the image. Two deterministic steps
make its outputs depend on the input:

- the BatchNorm statistics are calibrated on seeded smooth random images, letterboxed as in serving (one
  train-mode pass), so each layer's features have unit scale on image-like inputs;
- the class logits' input-dependent part is rescaled to a standard deviation of 1 on those images.

Class biases keep ultralytics' 1 % object prior (scores mostly below 0.01: nothing at the default
confidence); ``class_bias`` (a logit, e.g. -1.5) makes a network that fires on some anchors.
"""

from __future__ import annotations

from pathlib import Path

from festival_serve.models.sign_detector.ultralytics_io import configure_ultralytics_offline

#: Side of the calibration images, pixels, and the grid of random values they are upsampled from.
CALIBRATION_SIZE = 320
CALIBRATION_GRID = 20
#: Standard deviation of the input-dependent part of the class logits on the calibration images.
LOGIT_STD = 0.3


def build_yolo_checkpoint(
    path: Path,
    names: dict[int, str] | list[str],
    *,
    scale: str = "n",
    seed: int = 0,
    class_bias: float | None = None,
) -> Path:
    """Write a ``yolov8{scale}`` detection checkpoint for ``names`` to ``path`` and return ``path``."""
    configure_ultralytics_offline()  # before ultralytics is first imported
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    names = dict(enumerate(names)) if isinstance(names, list) else dict(names)
    cfg = f"yolov8{scale}.yaml"
    # A YOLO built from the yaml carries the args and task that ``save`` writes; its 80-class network is swapped out.
    yolo = YOLO(cfg, task="detect", verbose=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DetectionModel(cfg, nc=len(names), verbose=False)
    _calibrate(model, seed, class_bias)
    model.names = names
    model.args, model.task = yolo.model.args, "detect"
    yolo.model = model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(path)
    return path


def smooth_random_image(height: int, width: int, seed: int):
    """``(height, width, 3) uint8 RGB`` random colours blended over ~20 px: the images the network is calibrated on."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (max(height // CALIBRATION_GRID, 2), max(width // CALIBRATION_GRID, 2), 3), np.uint8)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)


def _calibrate(model, seed: int, class_bias: float | None) -> None:
    import torch

    from festival_serve.models.sign_detector.detector import letterbox_batch

    # Landscape, portrait and square frames, letterboxed as in serving: grey bars and their edges included.
    shapes = [(480, 848), (848, 480), (640, 640)]
    images = [smooth_random_image(h, w, seed + i) for i, (h, w) in enumerate(shapes)]
    batch = torch.from_numpy(letterbox_batch(images, CALIBRATION_SIZE)[0])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the running statistics become this batch's statistics
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum

    head = model.model[-1]
    logits = [branch[-1] for branch in head.cv3]  # the 1x1 convs that output each level's class logits
    outputs = []
    hooks = [conv.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for conv in logits]
    with torch.no_grad():
        model(batch)
        for conv, out in zip(logits, outputs):
            varying = out - conv.bias.view(1, -1, 1, 1)
            conv.weight.mul_(LOGIT_STD / varying.std().clamp_min(1e-6))
            if class_bias is not None:
                conv.bias[: head.nc] = class_bias
    for hook in hooks:
        hook.remove()


def build_yolo_classifier(path: Path, names: dict[int, str] | list[str], *, favour: str, seed: int = 0) -> Path:
    """Write a ``yolov8n-cls`` classification checkpoint for ``names`` whose top class is always ``favour``.

    Random weights, and the head's bias for ``favour`` set far above the rest, so a test knows what every
    crop will be called while the crop still runs through the whole network (and its ONNX export)."""
    configure_ultralytics_offline()  # before ultralytics is first imported
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import ClassificationModel

    names = dict(enumerate(names)) if isinstance(names, list) else dict(names)
    yolo = YOLO("yolov8n-cls.yaml", task="classify", verbose=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ClassificationModel("yolov8n-cls.yaml", nc=len(names), verbose=False)
    with torch.no_grad():
        model.model[-1].linear.bias.zero_()
        model.model[-1].linear.bias[list(names.values()).index(favour)] = 50.0
    model.names = names
    model.args, model.task = yolo.model.args, "classify"
    yolo.model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(path)
    return path
