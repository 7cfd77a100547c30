"""The sign detector's and sign classifier's pre/post-processing as batched torch ops on the network's device.

At GPU speed, letterboxing frames with cv2, NMS on the host and cutting crops through PIL leave the GPU
waiting on the CPU. These functions do the same work on whatever device the tensors live on, so a frame
crosses to the GPU once (uint8, 1 byte a value) and only the final boxes and class probabilities come back.
They mirror the host path (``festival_serve.models.sign_detector.detector``, ``.classifier``) step for step,
with the geometry of both from ``festival_serve.models.sign_detector.boxes``:

- ``letterbox_frames``: ``boxes.letterbox_meta`` (ultralytics' ``LetterBox`` geometry), so ``LetterboxMeta`` is
  identical; bilinear resize without antialiasing as cv2's ``INTER_LINEAR``, rounded half up into whole grey
  levels as cv2 writes ``uint8``. cv2's fixed-point SIMD kernel truncates some intermediates, so where the
  scale is not a whole ratio up to one value in ten lands one grey level (1/255) lower there than here
  (whole ratios, 1280x720 → 320x180, match exactly).
- ``postprocess_on_device``: ultralytics' own ``non_max_suppression`` and ``scale_boxes`` on device tensors.
- ``square_crops``: ``classifier.square_crop``'s square (``boxes.square_window``, grey where it leaves the
  frame) as views of the uploaded frames; ``preprocess_crops_on_device`` resizes them as ``classify_transforms``
  does through PIL (antialiased bilinear, rounded into grey levels), to [0, 1].

Only the torch and TensorRT backends take device tensors (``Backend.takes_device_tensors``); torch is imported
at the top here, so the detector imports this module only on that path and ONNX Runtime replicas never load it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from festival_serve.pipeline.types import SignDetection
from festival_serve.models.sign_detector.boxes import LetterboxMeta, NmsOptions, letterbox_meta, square_window
from festival_serve.models.sign_detector.ultralytics_io import PAD_VALUE, configure_ultralytics_offline


@torch.inference_mode()
def upload_frames(images: list[np.ndarray], device: str | torch.device) -> list[torch.Tensor]:
    """``(H, W, 3) uint8 RGB`` frames (read-only is fine) → ``(3, H, W) uint8`` views on ``device``, one copy each.

    The detector letterboxes these and the classifier cuts its crops from the same tensors, so each frame
    crosses to the device once, at a quarter of the bytes of a float32 copy.
    """
    frames = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        # torch.tensor copies straight onto the device, and takes Ray's read-only arrays without a warning.
        frames.append(torch.tensor(image, device=device).permute(2, 0, 1))  # CHW view, channels-last strides
    return frames


def letterbox_on_device(
    images: list[np.ndarray], size: int, device: str | torch.device
) -> tuple[torch.Tensor, list[LetterboxMeta]]:
    """``detector.letterbox_batch`` on ``device``: ``(N, 3, size, size) float32`` in [0, 1] and the same metas."""
    if not images:
        return torch.empty((0, 3, size, size), dtype=torch.float32, device=device), []
    return letterbox_frames(upload_frames(images, device), size)


@torch.inference_mode()
def letterbox_frames(frames: list[torch.Tensor], size: int) -> tuple[torch.Tensor, list[LetterboxMeta]]:
    """``(3, H, W) uint8`` frames on one device → ``(N, 3, size, size) float32`` in [0, 1] there, and metas.

    One resize per frame: frames of a batch may differ in size, and a float32 copy of one frame at a time
    (25 MB at 1080p) stays small beside a replica's GPU memory cap, where a stack of the batch would not.
    """
    batch = torch.full((len(frames), 3, size, size), float(PAD_VALUE), dtype=torch.float32, device=frames[0].device)
    metas = []
    for i, frame in enumerate(frames):
        meta = letterbox_meta(*frame.shape[1:], size)
        (new_h, new_w), (left, top) = meta.resized_shape, meta.pad
        resized = frame.unsqueeze(0).float()
        if (new_h, new_w) != tuple(frame.shape[1:]):  # LetterBox skips cv2.resize then too
            resized = F.interpolate(resized, size=(new_h, new_w), mode="bilinear", align_corners=False)
            resized = _round_half_up(resized)
        batch[i, :, top : top + new_h, left : left + new_w] = resized[0]
        metas.append(meta)
    return batch.div_(255.0), metas  # whole grey levels / 255 in float32: the host path's values exactly


@torch.inference_mode()
def postprocess_on_device(raw: torch.Tensor, metas: list[LetterboxMeta], names: dict[int, str],
                          options: NmsOptions) -> list[list[SignDetection]]:
    """``detector.postprocess`` on ``raw``'s device: ``(N, 4 + nc, anchors)`` → detections in original pixels.

    NMS and the mapping back to original pixels run where ``raw`` is; the kept rows, ``(K, 6)`` for the whole
    batch, cross to the host in one copy.
    """
    configure_ultralytics_offline()
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    if not metas:
        return []
    if raw.ndim != 3 or raw.shape[0] != len(metas) or raw.shape[1] != 4 + len(names):
        raise ValueError(
            f"expected raw predictions (N={len(metas)}, 4 + {len(names)} classes, anchors), got {tuple(raw.shape)}"
        )
    preds = raw.float()  # an fp16 network's outputs: NMS in float32, as the host path's float32 copy
    if preds.shape[2] == 6:
        # A last axis of 6 reads as an end-to-end (N, boxes, 6) output to ultralytics' NMS; one more anchor that
        # scores 0 (never kept) keeps it from being misread.
        preds = torch.cat([preds, preds.new_zeros(preds.shape[:2] + (1,))], dim=2)
    per_image = non_max_suppression(
        preds,
        conf_thres=options.confidence,
        iou_thres=options.iou,
        max_det=options.max_detections,
        nc=len(names),
        agnostic=options.agnostic,
        # Its default time budget (2 s + 50 ms/image) drops the remaining images' boxes with only a warning
        # once exceeded; on a CPU replica under festival load that is a silent wrong answer, so never stop early.
        max_time_img=math.inf,
    )
    rows = [
        torch.cat([scale_boxes(meta.input_shape, det[:, :4].clone(), meta.orig_shape, ratio_pad=meta.ratio_pad),
                   det[:, 4:6]], dim=1)
        for det, meta in zip(per_image, metas)
    ]
    kept = torch.cat(rows).cpu().tolist()  # (K, 6) x1, y1, x2, y2, score, class: the batch's one device→host copy
    results, start = [], 0
    for det in per_image:
        end = start + len(det)
        results.append(
            [SignDetection(box=tuple(row[:4]), label=names[int(row[5])], class_id=int(row[5]), score=row[4])
             for row in kept[start:end]]
        )
        start = end
    return results


@torch.inference_mode()
def square_crops(
    frames: list[torch.Tensor], boxes: list[list[tuple[float, float, float, float]]], context: float
) -> list[torch.Tensor]:
    """Per frame, per box: ``classifier.square_crop`` on the frames' device, ``(3, S, S)`` in the frames' dtype.

    ``frames``: ``(3, H, W)`` on one device, as ``upload_frames`` made them for the detector. The square comes
    from ``boxes.square_window`` on the host boxes; each crop is a view of its frame where the square lies inside
    it, padded with grey where it leaves it.
    """
    return [_square_crop(frame, box, context) for frame, frame_boxes in zip(frames, boxes) for box in frame_boxes]


@torch.inference_mode()
def preprocess_crops_on_device(crops: list[torch.Tensor], size: int) -> torch.Tensor:
    """``classifier.preprocess_crops`` on the crops' device: ``(3, S, S)`` uint8 crops (or float holding the same
    0-255 values) → ``(M, 3, size, size) float32`` in [0, 1] there."""
    out = torch.empty((len(crops), 3, size, size), dtype=torch.float32, device=crops[0].device)
    for i, crop in enumerate(crops):
        # classify_transforms: Resize(size) on a square is size x size (its CenterCrop is then a no-op),
        # through PIL's antialiased bilinear, whose uint8 result ToTensor divides by 255.
        out[i] = F.interpolate(crop.unsqueeze(0).float(), size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)[0]
    return _round_half_up(out).div_(255.0)  # Normalize(mean 0, std 1) leaves the values as they are


def _square_crop(frame: torch.Tensor, box: tuple[float, float, float, float], context: float) -> torch.Tensor:
    """``classifier.square_crop`` on a ``(3, H, W)`` tensor: a view of it where the square is inside it."""
    window = square_window(box, context, *frame.shape[1:])
    if window.empty:  # wholly outside the frame: all grey, as on the host
        return frame.new_full((3, window.side, window.side), PAD_VALUE)
    left, top, side = window.left, window.top, window.side
    padding = (window.x1 - left, left + side - window.x2, window.y1 - top, top + side - window.y2)  # F.pad's order
    inside = frame[:, window.y1 : window.y2, window.x1 : window.x2]
    return F.pad(inside, padding, value=PAD_VALUE) if any(padding) else inside


def _round_half_up(values: torch.Tensor) -> torch.Tensor:
    """Interpolated grey levels → whole ones, .5 upwards, as cv2's and PIL's fixed-point ``uint8`` writes do
    (``torch.round`` rounds .5 to even, which misses cv2's exact 2x and 4x downscales by a level in ~1 value
    in 8). Values stay within 0-255: bilinear weights are non-negative and sum to 1."""
    return values.add_(0.5).floor_()
