"""Per-model microbenchmarks: images (or crops, or tokens) per second against batch size, for every
backend this machine has (PyTorch and ONNX Runtime on the CPU; fp32 and fp16 on CUDA when present).
In-process, no Ray, no HTTP: the ceiling each model sets for the served graph."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from festival_serve.pipeline.settings import PipelineArgs


def _median_s(run: Callable[[], object], repeats: int, min_seconds: float) -> float:
    run()  # warm-up: first calls allocate arenas and pick kernels
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - started < min_seconds and len(times) < 50):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def backend_variants(cuda: bool) -> list[tuple[str, str, bool]]:
    """(backend, device, fp16) combinations worth measuring here."""
    variants = [("torch", "cpu", False), ("onnxruntime", "cpu", False)]
    if cuda:
        variants += [("torch", "cuda", False), ("torch", "cuda", True),
                     ("onnxruntime", "cuda", False), ("onnxruntime", "cuda", True)]
    return variants


def network_rows(model: str, source, input_shape: tuple[int, int, int], batch_sizes: list[int], *, cuda: bool,
                 threads: int | None, repeats: int, min_seconds: float, progress: Callable[[str], None],
                 unit: str = "images") -> list[dict]:
    from festival_serve.runtime.backends import BackendUnavailable, create_backend

    rows = []
    for kind, device, fp16 in backend_variants(cuda):
        try:
            backend = create_backend(kind, source, device=device, fp16=fp16, threads=threads)
        except BackendUnavailable as e:
            progress(f"  {model} {kind}/{device}: skipped ({e})")
            continue
        for n in batch_sizes:
            batch = np.random.default_rng(n).random((n, *input_shape), dtype=np.float32)
            seconds = _median_s(lambda: backend.forward(batch), repeats, min_seconds)
            rows.append({"model": model, "backend": kind, "device": device, "precision": "fp16" if fp16 else "fp32",
                         "batch": n, "ms_per_batch": round(seconds * 1000, 2), "items_per_s": round(n / seconds, 2),
                         "unit": unit})
            progress(f"  {model} {kind}/{device}/{rows[-1]['precision']} batch {n}: {rows[-1]['items_per_s']} {unit}/s")
    return rows


#: The reader before issue 14: rapidocr's PP-OCRv6 det + rec, text detection at 320 px; the served reader's
#: crops/s are quoted against it, measured in the same run.
READER_BASELINE = {"rec_model": None, "rec_dict": None, "det_size": 320}
READER_BASELINE_NAME = "sign_reader (PP-OCRv6, det 320)"


def sign_crops(count: int, seed: int = 10_000_000) -> list[np.ndarray]:
    """Crops of generated signs that print text (true boxes), as the ingress sends the reader in serving:
    speed-limit discs and information plates in the order scenes show them."""
    from festival_serve.serving.imaging import crop
    from festival_serve.world.synth import TEXT_CLASSES, generate_scene

    crops: list[np.ndarray] = []
    scene_seed = seed
    while len(crops) < count:
        scene = generate_scene(scene_seed)
        crops += [crop(scene.image, s.box, 0.05) for s in scene.signs if s.sign_class in TEXT_CLASSES]
        scene_seed += 1
    return crops[:count]


def run_micro(args: PipelineArgs, *, batch_sizes: list[int], vlm_batch_sizes: list[int], threads: int | None,
              repeats: int, min_seconds: float, progress: Callable[[str], None] = print,
              describer_cost_model=None) -> list[dict]:
    """Per-model throughput at each batch size. ``describer_cost_model``: SceneDescriberSettings of a second
    describer measured beside the served one (the bench's SmolVLM-256M-shaped stand-in)."""
    from festival_serve.models.scene_describer.describer import SceneDescriber
    from festival_serve.models.sign_reader.reader import create_reader
    from festival_serve.runtime.devices import cuda_available
    from festival_serve.models.sign_detector.detector import YoloCheckpoint
    from festival_serve.world.synth import generate_scene
    from festival_serve.models.hazard_cells.yolic import INPUT_SIZE, YolicNetwork, load_layout

    cuda = cuda_available()
    store = Path(args.model_store)
    size = args.sign_detector.image_size
    rows: list[dict] = []
    progress("microbenchmarks: sign detector")
    rows += network_rows("sign_detector", YoloCheckpoint(args.store_path(args.sign_detector.weights), size),
                         (3, size, size), batch_sizes, cuda=cuda, threads=threads, repeats=repeats,
                         min_seconds=min_seconds, progress=progress)
    signs = args.sign_detector
    if signs.classifier:
        from festival_serve.models.sign_detector.classifier import ClassifierCheckpoint

        progress("microbenchmarks: sign classifier (one crop per detected sign)")
        rows += network_rows("sign_classifier", ClassifierCheckpoint(args.store_path(signs.classifier),
                                                                     signs.classifier_image_size),
                             (3, signs.classifier_image_size, signs.classifier_image_size), batch_sizes, cuda=cuda,
                             threads=threads, repeats=repeats, min_seconds=min_seconds, progress=progress, unit="crops")
    progress("microbenchmarks: hazard cells")
    rows += network_rows("hazard_cells", YolicNetwork(args.store_path(args.hazard_cells.weights),
                                                      load_layout(args.hazard_cells.layout)),
                         (3, INPUT_SIZE, INPUT_SIZE), batch_sizes, cuda=cuda, threads=threads, repeats=repeats,
                         min_seconds=min_seconds, progress=progress)

    progress("microbenchmarks: sign reader (PP-OCR det + rec on sign crops), served and the PP-OCRv6 baseline")
    crops = sign_crops(max(batch_sizes))
    baseline = args.sign_reader.model_copy(update=READER_BASELINE)
    readers = [("sign_reader", args.sign_reader)]
    if baseline != args.sign_reader:
        readers.append((READER_BASELINE_NAME, baseline))
    for device in ["cpu", *(["cuda"] if cuda else [])]:
        served_rate: dict[int, float] = {}
        for name, settings in readers:
            reader = create_reader(settings.model_copy(update={"device": device, "threads": threads}),
                                model_store=store)
            for n in batch_sizes:
                seconds = _median_s(lambda: reader.read(crops[:n]), repeats, min_seconds)
                rows.append({"model": name, "backend": "onnxruntime", "device": device, "precision": "fp32",
                             "batch": n, "ms_per_batch": round(seconds * 1000, 2), "items_per_s": round(n / seconds, 2),
                             "unit": "crops"})
                progress(f"  {name} onnxruntime/{device} batch {n}: {rows[-1]['items_per_s']} crops/s")
                if name == "sign_reader":
                    served_rate[n] = n / seconds
                elif served_rate.get(n):
                    ratio = served_rate[n] / (n / seconds)
                    rows[-1]["served_speedup"] = round(ratio, 2)
                    progress(f"  sign_reader at batch {n}: {ratio:.2f}x the crops/s of the PP-OCRv6 baseline")

    progress("microbenchmarks: scene describer (batched generate on held-out scenes and their true findings)")
    from festival_serve.world.descriptions import findings_from_truth

    layout = load_layout(args.hazard_cells.layout)
    scenes = [generate_scene(10_000_000 + i) for i in range(max(vlm_batch_sizes))]
    frames = [scene.image for scene in scenes]
    findings = [findings_from_truth(scene.signs, scene.cells, layout.classes, layout.boxes) for scene in scenes]
    variants = [("cpu", "float32")] + ([("cuda", "float32"), ("cuda", "float16")] if cuda else [])
    describers = [("scene_describer", args.scene_describer)]
    if describer_cost_model is not None and describer_cost_model.model != args.scene_describer.model:
        describers.append(("scene_describer (SmolVLM-256M stand-in)", describer_cost_model))
    for name, base in describers:
        for device, dtype in variants:
            settings = base.model_copy(update={"device": device, "dtype": dtype, "threads": threads})
            describer = SceneDescriber(settings, model_store=store)
            for n in vlm_batch_sizes:
                generated: list[int] = []
                seconds = _median_s(lambda: generated.append(sum(map(len, describer.generate_ids(frames[:n],
                                                                                                 findings[:n])))),
                                    1, 0.0)
                new_tokens = generated[-1]  # trained weights stop when the description ends
                rows.append({"model": name, "backend": "torch", "device": device,
                             "precision": "fp16" if dtype == "float16" else "fp32", "batch": n,
                             "ms_per_batch": round(seconds * 1000, 1), "items_per_s": round(n / seconds, 3),
                             "tokens_per_s": round(new_tokens / seconds, 1), "new_tokens_per_item": round(new_tokens / n, 1),
                             "unit": "frames"})
                progress(f"  {name} torch/{device}/{dtype} batch {n}: {rows[-1]['ms_per_batch']} "
                         f"ms, {rows[-1]['new_tokens_per_item']} new tokens a frame, {rows[-1]['tokens_per_s']} tokens/s")
            del describer
    return rows
