"""Shape-true model store for benchmarks: trained weights where present, real-size stand-ins elsewhere.

``with_stand_ins(args, cache)`` returns the pipeline's settings with every model whose weights are
missing pointed at a stand-in of the production architecture at its production size (YOLOv8n with
the sign classes, YOLIC-M2, SmolVLM-256M's Idefics3), each built once into ``cache``. The PP-OCR
models ship with rapidocr, so the sign reader is always the real one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from festival_serve.pipeline.settings import PipelineArgs

#: Bump when a stand-in's recipe changes, so cached ones are rebuilt.
RECIPE = "1"


@dataclass(frozen=True)
class ModelSource:
    stage: str
    kind: str  # "trained", "stand-in" or "bundled"
    path: str


def default_cache() -> Path:
    return Path("~/.cache/festival-serve/stand-ins").expanduser()


def _built(target: Path, build: Callable[[Path], None], progress: Callable[[str], None], what: str) -> Path:
    """``target`` (a file or directory), built by ``build(tmp)`` and moved into place unless already there."""
    if target.exists():
        return target
    progress(f"building stand-in {what} → {target} (once; cached)")
    tmp = target.with_name(f".building-{target.name}")  # same suffix: some writers look at it
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    build(tmp)
    tmp.replace(target)
    return target


def smolvlm_stand_in(cache: Path, *, progress: Callable[[str], None] = print) -> Path:
    """The SmolVLM-256M-shaped random model (built once under ``cache``, a recipe folder): the real model's
    cost, generating exactly ``max_new_tokens`` every time."""
    from festival_serve.training.standins.scene_describer import SMOLVLM_256M, build_idefics3

    # bf16 on disk halves the size; SceneDescriber casts to its own dtype when loading.
    return _built(cache / "scene_describer" / "SmolVLM-256M-shape",
                  lambda tmp: build_idefics3(tmp, SMOLVLM_256M, fixed_new_tokens=True, dtype="bfloat16"),
                  progress, "SmolVLM-256M (Idefics3, 256M parameters)")


def with_stand_ins(
    args: PipelineArgs, cache: Path | None = None, *, progress: Callable[[str], None] = print
) -> tuple[PipelineArgs, list[ModelSource]]:
    """``args`` with each missing model replaced by a shape-true stand-in, and where each model came from."""
    from festival_serve.models.scene_describer.describer import WeightsMissing, check_weights, model_dir
    from festival_serve.world.synth import SIGN_CLASSES
    from festival_serve.models.hazard_cells.yolic import load_layout

    cache = (cache or default_cache()) / f"recipe-{RECIPE}"
    update: dict[str, dict] = {}
    sources: list[ModelSource] = []

    signs = args.store_path(args.sign_detector.weights)
    if signs.is_file():
        sources.append(ModelSource("sign_detector", "trained", str(signs)))
    else:
        from festival_serve.training.standins.sign_detector import build_yolo_checkpoint

        path = _built(cache / "sign_detector" / "yolov8n.pt",
                      lambda tmp: build_yolo_checkpoint(tmp, list(SIGN_CLASSES), scale="n"),
                      progress, "YOLOv8n sign detector")
        update["sign_detector"] = {"weights": str(path)}
        sources.append(ModelSource("sign_detector", "stand-in", str(path)))

    classifier = args.sign_detector.classifier and args.store_path(args.sign_detector.classifier)
    if classifier and classifier.is_file():
        sources.append(ModelSource("sign_classifier", "trained", str(classifier)))
    elif classifier:
        from festival_serve.models.sign_detector.classifier import BACKGROUND
        from festival_serve.training.standins.sign_detector import build_yolo_classifier

        # Always answers "info": every stand-in detection then goes on to the reader, as text signs do.
        path = _built(cache / "sign_classifier" / "yolov8n-cls.pt",
                      lambda tmp: build_yolo_classifier(tmp, [*SIGN_CLASSES, BACKGROUND], favour="info"),
                      progress, "YOLOv8n-cls sign classifier")
        update["sign_detector"] = {**update.get("sign_detector", {}), "classifier": str(path)}
        sources.append(ModelSource("sign_classifier", "stand-in", str(path)))

    hazards = args.store_path(args.hazard_cells.weights)
    if hazards.is_file():
        sources.append(ModelSource("hazard_cells", "trained", str(hazards)))
    else:
        from festival_serve.training.standins.hazard_cells import build_yolic_checkpoint

        layout = load_layout(args.hazard_cells.layout)
        path = _built(cache / "hazard_cells" / "yolic_m2.pth.tar",
                      lambda tmp: build_yolic_checkpoint(tmp, layout), progress, "YOLIC-M2")
        update["hazard_cells"] = {"weights": str(path)}
        sources.append(ModelSource("hazard_cells", "stand-in", str(path)))

    reader = args.sign_reader
    sources.append(ModelSource("sign_reader", "trained" if reader.rec_model else "bundled",
                               reader.rec_model or "rapidocr PP-OCR (det + rec ONNX)"))

    describer = model_dir(args.scene_describer, model_store=Path(args.model_store))
    try:
        check_weights(describer)
        sources.append(ModelSource("scene_describer", "trained", str(describer)))
    except WeightsMissing:
        path = smolvlm_stand_in(cache, progress=progress)
        update["scene_describer"] = {"model": str(path)}
        sources.append(ModelSource("scene_describer", "stand-in", str(path)))

    merged = args.model_dump()
    for section, values in update.items():
        merged[section].update(values)
    return PipelineArgs.model_validate(merged), sources
