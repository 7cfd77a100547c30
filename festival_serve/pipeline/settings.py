"""Typed settings for every model and for the pipeline, in one place.

These are the ``args:`` of the Serve application (``graphs.pipeline:build_app``) in
``serve_config.yaml``; each deployment receives its own section. Paths of weights are relative to
``model_store`` unless absolute. Replicas, resources, autoscaling and batch sizes are not here: they
live in ``serve_config.yaml`` (batch sizes via each deployment's ``user_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from festival_serve.pipeline.stages import STAGE_NAMES, STAGES

BackendName = Literal["auto", "torch", "onnxruntime", "tensorrt"]
Device = str  # "auto", "cpu", "cuda", "cuda:N"


def in_store(value: str, model_store: str | Path) -> Path:
    """A weights path from the settings: relative to ``model_store`` unless absolute."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(model_store).expanduser() / path


def _required_stage_names() -> list[str]:
    """The stages the stage table marks required."""
    return [stage.name for stage in STAGES if stage.required]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class BatchConfig(_Section):
    """A deployment's ``user_config``: Ray Serve dynamic batching knobs, applied in ``reconfigure``."""

    max_batch_size: int = Field(8, ge=1, description="Most requests (or OCR crops) in one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a partial batch waits for more requests, in seconds."
    )
    max_consecutive_failed_batches: int = Field(
        3, ge=1,
        description="check_health fails (Serve replaces the replica) after this many batches in a row in which "
        "every item failed; any batch with one success resets the count. Missing weights never count.",
    )
    niceness: int = Field(
        0, ge=0, le=19,
        description="CPU scheduling niceness of the replica's process (0: normal). Where models share CPU cores "
        "with Serve's proxy and the ingress (a CPU-only node), a positive value lets the request path run first, "
        "so excess load is still turned away in milliseconds while the models are saturated.",
    )


#: ONNX Runtime on the CPU: how a batch spreads over the cores (the detectors and the reader share it).
BATCH_SLICES_DOC = (
    "CPU only: a batch of N items runs as min(N, batch_slices) slices at once, each on `threads` "
    "threads, so the stage with a queue gets the cores and an idle one holds none (null: one run per batch; the "
    "local profile sets cores / threads)."
)


class _NetworkSettings(_Section):
    """What a stage that runs exportable networks (ONNX / TensorRT) is run with."""

    backend: BackendName = Field(
        "auto",
        description="auto: on CUDA, TensorRT where an engine built by `festival-serve engines build` exists and "
        "TensorRT is installed, else torch; on CPU, onnxruntime (ONNX exported from the checkpoint).",
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N.")
    fp16: bool | None = Field(
        None,
        description="Half precision. Default: on for CUDA, off for CPU. Every backend honours it: torch casts the "
        "module, TensorRT builds an fp16 engine, onnxruntime runs an fp16 copy of the exported graph (inputs and "
        "outputs stay float32).",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for the runtime (None: runtime default).")
    batch_slices: int | None = Field(None, ge=1, description=BATCH_SLICES_DOC)
    build_engines: bool = Field(
        False,
        description="Let a replica build a missing TensorRT engine at start-up. Off: replicas only load engines "
        "(a build takes minutes and a GPU workspace the other replicas share); a missing one is a start-up error "
        "that names `festival-serve engines build`.",
    )


class SignDetectorSettings(_NetworkSettings):
    weights: str = Field("sign_detector/signs.pt", description="Ultralytics YOLO checkpoint (.pt).")
    image_size: int = Field(640, ge=32, multiple_of=32, description="Square letterbox side, pixels.")
    stream_image_size: int | None = Field(
        None, ge=32, multiple_of=32,
        description="Square letterbox side for camera-stream frames (WS /v1/streams), pixels; null: image_size. "
        "A stream tracks signs from 24 px, which a small letterbox misses on many frames; the stage loads the "
        "network at both sizes and batches each size apart.",
    )
    confidence: float = Field(0.25, gt=0, lt=1, description="Minimum class score of a kept box.")
    iou: float = Field(0.45, gt=0, lt=1, description="NMS IoU threshold.")
    max_detections: int = Field(50, ge=1, description="Most signs kept per image.")
    classifier: str | None = Field(
        "sign_classifier/sign_classes.pt",
        description="Ultralytics classification checkpoint that names each detected sign from its full-resolution "
        "crop (same backend and device as the detector); null keeps the detector's own class.",
    )
    classifier_image_size: int = Field(64, ge=16, multiple_of=16, description="Classifier input side, pixels.")
    classifier_context: float = Field(1.15, ge=1, le=3, description="Crop side / the box's longer side.")
    text_classes: list[str] | None = Field(
        None,
        description="Sign classes that carry text: only their crops go to the reader (a pictogram has nothing to "
        "read, and reading it costs a reader call and can invent a letter). null: read every sign.",
    )
    preprocess: Literal["auto", "host", "device"] = Field(
        "auto",
        description="Where letterbox, NMS and the classifier's crops run. auto: on the device when the stage runs "
        "on CUDA with a backend that takes device tensors (torch, tensorrt), else on the host; device: as torch "
        "tensors wherever the backend runs (refused with onnxruntime, which takes host arrays); host: numpy/cv2 on "
        "the CPU, as ultralytics does.",
    )

    @property
    def stream_size(self) -> int:
        """The letterbox side camera-stream frames get, pixels."""
        return self.stream_image_size or self.image_size


class HazardCellsSettings(_NetworkSettings):
    weights: str = Field("hazard_cells/yolic_m2.pth.tar", description="YOLIC-M2 state_dict checkpoint.")
    layout: str = Field(
        "outdoor", description="Cell layout: a bundled name ('outdoor') or a path to a layout JSON file."
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="Sigmoid score above which a cell carries a label.")


class SignReaderSettings(_Section):
    engine: Literal["onnx", "paddle"] = Field(
        "onnx", description="onnx: PP-OCR det+rec ONNX models on ONNX Runtime; paddle: PaddleOCR 3.x."
    )
    det_model: str | None = Field(None, description="PP-OCR detection ONNX; default: the one shipped in rapidocr.")
    rec_model: str | None = Field(
        None, description="PP-OCR recognition ONNX, or a `train sign-text` checkpoint (.pt: its ONNX export is served); "
                          "default: the PP-OCRv6 one shipped in rapidocr.")
    rec_dict: str | None = Field(
        None, description="Recognizer character dictionary (one char per line); default: the model's own."
    )
    device: Device = "auto"
    det_size: int = Field(320, ge=32, multiple_of=32, description="Square side each crop is letterboxed to for text detection.")
    rec_height: int = Field(48, ge=16, description="Recognizer input height, pixels.")
    min_text_score: float = Field(0.5, ge=0, le=1, description="Text lines scoring below this are dropped.")
    threads: int | None = Field(None, ge=1, description="CPU threads for each ONNX Runtime session (None: its default).")
    batch_slices: int | None = Field(None, ge=1, description=BATCH_SLICES_DOC)


class SceneDescriberSettings(_Section):
    model: str = Field(
        "scene_describer/festival-describer",
        description="A transformers Idefics3 model directory (weights, processor, tokenizer): the small describer "
        "trained here on the festival world (`festival-serve train describer`), or pull_into after `models pull`.",
    )
    hub_id: str = Field(
        "HuggingFaceTB/SmolVLM-256M-Instruct", description="The real model `festival-serve models pull` fetches."
    )
    pull_into: str = Field(
        "scene_describer/SmolVLM-256M-Instruct", description="Where `models pull` puts hub_id; set model to it to serve it."
    )
    device: Device = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    max_new_tokens: int = Field(48, ge=1, le=1024)
    do_image_splitting: bool = Field(
        False, description="Split frames into tiles (13 tiles, 832 image tokens) instead of one 64-token image."
    )
    longest_edge: int | None = Field(
        None, ge=32, description="Resize frames so the longest edge is this many pixels (None: the processor's default)."
    )
    threads: int | None = Field(None, ge=1)


class StreamSettings(_Section):
    """``ingress.streams``: the camera streams of ``WS /v1/streams`` (festival_serve.serving.streams), per ingress
    replica. Tracking, reading once per track and the events are festival_serve.serving.tracking's."""

    max_streams: int = Field(
        32, ge=1,
        description="Streams one ingress replica holds at once; a new socket beyond it is closed with 1013 (try "
        "again later) and a retry hint. Streams are sticky to the replica that accepted them.",
    )
    frames_in_flight: int = Field(
        8, ge=1,
        description="Stream frames one ingress replica has in the graph at once, over all its streams. A stream "
        "waits for a slot in turn (round robin over the streams that have a frame ready), so a fast camera gets "
        "no more than its fair share of these slots while others wait.",
    )
    max_fps: float = Field(
        15.0, gt=0,
        description="Most frames per second processed per stream (a client may ask for fewer with `fps`): live "
        "frames arriving faster are dropped, newest kept.",
    )
    frame_budget_s: float = Field(
        1.0, gt=0,
        description="A stream frame's time budget from its arrival, seconds: every stage wait is bounded by it, "
        "and a live frame still waiting for a slot when it runs out is dropped as stale.",
    )
    idle_timeout_s: float = Field(
        15.0, gt=0, description="A socket that sends nothing (no frame, no ack) for this long is closed (1008).",
    )
    max_unacked_results: int = Field(
        64, ge=1,
        description="Results a client may leave unacknowledged (`ack` = the last `seq` it read). Serve's proxy "
        "buffers results without bound, so a client that stops reading would grow memory; beyond this many the "
        "stream is closed with 1008.",
    )
    every_frame_window: int = Field(
        4, ge=1,
        description="mode every_frame (files): frames a client may send ahead of their results. The server says "
        "it in its `ready` message; a frame beyond it is refused for that frame (`window_exceeded`).",
    )
    track_lost_s: float = Field(
        1.0, gt=0, description="A sign track that is not seen for this long ends (its `sign_passed` event).",
    )
    track_min_frames: int = Field(
        3, ge=1,
        description="Consecutive detections before a new track gets an id (short-lived false boxes get none; at 2 a "
        "low-score sign was announced twice on the clips).",
    )
    track_activation_score: float = Field(
        0.25, gt=0, lt=1,
        description="Least detector score that may start a track. The shipped detector scores some pictograms "
        "(pedestrian crossing) 0.16-0.45 on every frame of a clip; at 0.5 they were never tracked.",
    )
    track_high_score: float = Field(
        0.25, gt=0, lt=1,
        description="ByteTrack's split: detections above it are matched first, those below only to tracks already "
        "there (low scores keep a track alive, never start one).",
    )
    track_match_iou: float = Field(0.1, gt=0, lt=1, description="Least IoU of a detection with a track's prediction.")
    read_min_side_px: int = Field(
        24, ge=1, description="A sign track is read once its box's shorter side is at least this (frame pixels).",
    )
    read_min_sharpness: float = Field(
        20.0, ge=0,
        description="... and its crop is this sharp: the variance of the Laplacian of its grey pixels. A crop "
        "smeared flat reads under 20; the committed clips' sign crops of 24 px and more measure 64-6900.",
    )
    read_confident_score: float = Field(
        0.95, gt=0, le=1,
        description="A track's text read at this score or more, from a box of read_final_side_px or more, is final: "
        "it is not read again (at 0.9, 25 px reads of 0.93 like 'KHU DAN CI' stayed final).",
    )
    read_final_side_px: int = Field(
        32, ge=1, description="The shorter side a sign's box must have for a sure reading of it to be final.",
    )
    read_edge_margin_px: int = Field(
        2, ge=0, description="A box this close to the frame's edge is cut off (a sign leaving view): not read.",
    )
    read_growth: float = Field(
        1.5, gt=1,
        description="An unsure text is read again only once the sign's box has grown by this factor in area since "
        "its last read (a nearer sign prints larger letters).",
    )
    max_reads_per_track: int = Field(3, ge=1, description="Most reads of one sign track.")
    announce_wait_s: float = Field(
        1.0, ge=0,
        description="A text sign is announced (`sign_appeared`) when its text is read, or after this long unread, "
        "seconds (then without text, and `sign_read` follows when it is read).",
    )
    hazard_on_frames: int = Field(
        3, ge=1, description="Processed frames in a row a hazard label must be seen for `hazard_ahead`.",
    )
    hazard_off_frames: int = Field(
        5, ge=1, description="Processed frames in a row it must be gone for `hazard_cleared` (hysteresis).",
    )
    analyze_every: int = Field(
        3, ge=1,
        description="While every track of a stream is settled (confirmed, its text final) and every box is in a "
        "track (or has been outside one for `untracked_watch_s`), only every this-many-th frame goes through the "
        "graph; between them each track's box is predicted (a sign looming as the camera nears it), the hazards "
        "are the last analysed frame's, and the frame is not even decoded (DeepStream's `interval`). A new sign "
        "is then seen at most this many frames late. 1: every frame.",
    )
    untracked_watch_s: float = Field(
        1.0, ge=0,
        description="A box outside every track (a sign not yet confirmed, or scored too low to start a track) "
        "keeps every frame analysed for this long, seconds; one that stays outside longer is taken for a "
        "distractor and frames are skipped again.",
    )
    describe_every_s: float = Field(
        10.0, gt=0,
        description="With describe on, a stream's scene is described at most this often, and only on a frame "
        "with new events.",
    )


class IngressSettings(_Section):
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest accepted decoded image (width x height); guards decompression bombs."
    )
    decode_threads: int = Field(
        2, ge=1,
        description="Threads that decode request images, per ingress replica (or baseline process), off the event "
        "loop: at most this many frames decode at once, each holding up to max_image_pixels x 3 bytes.",
    )
    max_jpeg_scans: int = Field(
        64, ge=1,
        description="Most scans a JPEG may have (a baseline JPEG has 1, a progressive one ~10): each scan is decoded "
        "over the whole frame, so a small file that repeats one scan thousands of times costs seconds of CPU. "
        "Counted from the markers before decoding; more is a 400.",
    )
    decode_max_side: int = Field(
        2048, ge=320,
        description="Frames whose longer side is over this many pixels are decoded (JPEG: at 1/2, 1/4 or 1/8 scale "
        "by the decoder itself) and resized down to it; the detectors run at 320 px and sign crops of a 2048 px "
        "frame still carry their text. Boxes in the answer stay in the client's pixels.",
    )
    large_image_pixels: int = Field(
        8_000_000, ge=1,
        description="Frames over this many pixels decode on a thread of their own (one per ingress replica), so a "
        "sender of huge frames waits behind its own kind, not in front of the cameras' frames.",
    )
    large_lane_share: float = Field(
        0.1, gt=0, le=1,
        description="Most of one core's time the large lane (frames over large_image_pixels) may take, per ingress "
        "replica: after a huge frame's decode of t seconds the lane rests t x (1/share - 1) s, and a huge frame "
        "arriving while it decodes or rests is refused at once (503 + Retry-After). A sender of 40 MP frames then "
        "costs the cameras' frames at most this share of a core, however fast it sends. At 0.1 a replica still "
        "decodes a 40 MP PNG every few seconds (0.2-0.7 s each); huge frames are phones' photos, not cameras'.",
    )
    max_decoding_pixels: int = Field(
        48_000_000, ge=1,
        description="Pixels (width x height, summed) that may be decoding or waiting to decode at once, per ingress "
        "replica; a frame that would go over is refused at once (503 + Retry-After): admission by pixels as well "
        "as by frames.",
    )
    body_read_max_s: float = Field(
        5.0, gt=0,
        description="Longest a request body may take to arrive, seconds (and never longer than the request's "
        "budget): a body still arriving after it is a 408. A frame of the cameras' arrives in milliseconds.",
    )
    max_bodies_in_flight: int = Field(
        192, ge=1,
        description="Request bodies one ingress replica reads at once; more are refused at once (503 + "
        "Retry-After). Bodies are read before admission, so a slow upload never counts as work waiting. Each holds "
        "one of the replica's max_ongoing_requests (256 in serve_config.yaml): keep it under that, so bodies that "
        "arrived always find room.",
    )
    max_body_bytes_buffered: int = Field(
        256 * 1024 * 1024, ge=1024,
        description="Bytes of request bodies one ingress replica holds while they arrive, summed over every body "
        "being read; a body whose next bytes would go over is refused (503 + Retry-After). Bounds the memory of "
        "max_bodies_in_flight x max_body_bytes, which a trickled body does not need.",
    )
    probe_refresh_s: float = Field(
        1.0, gt=0,
        description="How often the ingress asks every stage for its state in the background, seconds: /readyz and "
        "/healthz answer from that state, never with model calls of their own.",
    )
    probe_rate_per_s: float = Field(
        50.0, gt=0,
        description="Most /healthz + /readyz + /v1/models answers per second per ingress replica (a token bucket "
        "of one second's worth); more get a 429 with Retry-After.",
    )
    keys_reload_s: float = Field(
        2.0, gt=0,
        description="How often the ingress checks its api_keys_file for changes, seconds: a key removed from the "
        "file stops working within this long, a key added starts.",
    )
    stage_requests_in_flight: int = Field(
        4, ge=1,
        description="Serve requests to one stage that one ingress replica keeps in flight at once. While that many "
        "are out, the frames' calls to the stage wait in the ingress and leave together, as one request, when one "
        "answers (festival_serve.serving.coalesce): a Serve request costs milliseconds of CPU whatever it carries, so under "
        "load the requests grow instead of multiplying; a call made while fewer are out leaves at once. Give each "
        "replica of a stage that this ingress feeds two, so it always has the next request queued.",
    )
    stage_request_max_calls: int = Field(
        16, ge=1, description="Most calls (frames) that travel in one request to a stage (1: every call alone).",
    )
    crop_padding: float = Field(0.05, ge=0, le=1, description="Sign crops grow by this fraction of the box per side.")
    max_signs_read: int = Field(16, ge=0, description="Most sign crops per image sent to the reader.")
    required_stages: list[str] = Field(
        default_factory=_required_stage_names,
        description="Stages whose model must be loaded for /readyz to answer 200 (default: the stages the stage "
        "table marks required: detector, hazard cells, reader; the scene describer is optional).",
    )
    default_budget_s: float = Field(
        10.0, gt=0,
        description="Time budget of a request that sends no x-request-timeout-seconds header, seconds. Every stage "
        "wait is bounded by what is left of it; the answer comes before it runs out.",
    )
    max_budget_s: float = Field(
        30.0, gt=0,
        description="Largest budget a client may ask for with x-request-timeout-seconds (larger values are clamped), "
        "seconds; keep it under http_options.request_timeout_s so the ingress, not the proxy, answers.",
    )
    admit_wait_fraction: float = Field(
        0.5, gt=0, le=1,
        description="A request is admitted when its safety stages' predicted queue wait is at most this fraction of "
        "what is left of its budget. The rest absorbs mispredictions under a surge and leaves time for the reader "
        "after the detector; at 1.0 admitted answers run right up to the budget and many come back degraded.",
    )
    answer_margin_s: float = Field(
        0.25, ge=0, description="Time kept back from the budget to build and send the answer (and for the hop from "
        "Serve's proxy, which starts the client's clock first), seconds.",
    )
    retry_after_s: float = Field(
        1.0, gt=0, description="Retry-After when no queue estimate says better (e.g. both safety stages failed), s."
    )
    streams: StreamSettings = Field(default_factory=StreamSettings)
    api_keys_file: str | None = Field(
        None,
        description="File of SHA-256 digests of the API keys that may call /v1 (festival_serve.serving.auth; make keys with "
        "`festival-serve keys new --file PATH`). Absolute, on every node that runs the ingress (e.g. a mounted "
        "secret). None: /v1 is open to anyone who can reach the port; /healthz and /readyz always are.",
    )

    @model_validator(mode="after")
    def _budgets_are_ordered(self) -> "IngressSettings":
        if self.default_budget_s > self.max_budget_s:
            raise ValueError(f"default_budget_s ({self.default_budget_s}) is over max_budget_s ({self.max_budget_s})")
        if self.answer_margin_s >= self.default_budget_s:
            raise ValueError("answer_margin_s must be smaller than default_budget_s")
        return self

    @field_validator("required_stages")
    @classmethod
    def _required_stages_exist(cls, names: list[str]) -> list[str]:

        unknown = [name for name in names if name not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} in required_stages; stages: {', '.join(STAGE_NAMES)}")
        return names


class PipelineArgs(_Section):
    """The application's typed ``args`` (Ray Serve application builder)."""

    model_store: str = Field("models", description="Directory holding every model's weights.")
    gpu_only: bool = Field(
        False, description="Refuse to start any model on the CPU (the seed's FORCE_GPU_ONLY)."
    )
    sign_detector: SignDetectorSettings = SignDetectorSettings()
    hazard_cells: HazardCellsSettings = HazardCellsSettings()
    sign_reader: SignReaderSettings = SignReaderSettings()
    scene_describer: SceneDescriberSettings = SceneDescriberSettings()
    ingress: IngressSettings = Field(default_factory=IngressSettings)  # built on use: its defaults read the stage table

    @model_validator(mode="after")
    def _gpu_only_is_consistent(self) -> "PipelineArgs":
        if self.gpu_only:
            for section in (self.sign_detector, self.hazard_cells, self.sign_reader, self.scene_describer):
                if section.device == "cpu":
                    raise ValueError(f"gpu_only is set but {type(section).__name__}.device is 'cpu'")
        return self

    def store_path(self, relative: str) -> Path:
        return in_store(relative, self.model_store)
