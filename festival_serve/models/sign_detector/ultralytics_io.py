"""Loading ultralytics checkpoints offline, and exporting them to ONNX with ultralytics' own exporter.

Shared by the sign detector (``festival_serve.models.sign_detector.detector``) and the sign classifier
(``festival_serve.models.sign_detector.classifier``); neither imports the other. ultralytics and torch are imported
inside functions, so importing this module is cheap and changes nothing in the environment:
``configure_ultralytics_offline`` runs just before ultralytics is first imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from festival_serve.runtime.cache import build_once, derived_name, file_sha256

logger = logging.getLogger(__name__)

#: Grey that ultralytics pads letterboxed images with; the network was trained on it.
PAD_VALUE = 114

#: download attempt (assets, fonts, weights by bare name); YOLO_AUTOINSTALL=0 stops ``check_requirements``
#: from pip-installing a missing package (the exporter asks for onnx/onnxslim/onnxruntime) — it warns instead.
_ULTRALYTICS_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}


def configure_ultralytics_offline() -> None:
    """Keep ultralytics off the network and away from pip, whether or not it is imported yet.

    Sets the environment switches it reads at import; if some other module imported ultralytics first, also
    overrides the module constants that were computed from them (``ONLINE``, ``AUTOINSTALL`` and the analytics
    ``events.enabled`` flag), since those are captured by value at import.
    """
    os.environ.update(_ULTRALYTICS_ENV)
    utils = sys.modules.get("ultralytics.utils")
    if utils is None:
        return
    utils.ONLINE = False
    utils.AUTOINSTALL = False
    if (checks := sys.modules.get("ultralytics.utils.checks")) is not None:
        checks.ONLINE = False
        checks.AUTOINSTALL = False
    if (events := sys.modules.get("ultralytics.utils.events")) is not None:
        events.events.enabled = False



class UltralyticsCheckpoint:
    """An ultralytics ``.pt`` checkpoint of one ``task`` as a ``NetworkSource``; its ONNX export (made by
    ultralytics' own exporter, input pinned to ``image_size``) is cached next to it by content hash."""

    task: str  # ultralytics' task name the checkpoint must carry ("detect", "classify")
    task_noun: str  # the same in words, for messages
    kind: str  # what it is, for messages
    prefix: str  # of ``name``, which logs and derived-file names use
    missing_hint = ""  # appended to the error for a missing file

    def __init__(self, path: Path, image_size: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.kind} weights not found: {self.path}{self.missing_hint}")
        self.image_size = image_size
        self.name = f"{self.prefix}:{self.path.name}"
        self.sha256 = file_sha256(self.path)
        cached = self._onnx_target()
        # A cached export was made from these exact bytes (and validated then): take the class names from
        # it and leave torch unimported, which keeps an ONNX Runtime replica ~500 MB smaller.
        self.names: dict[int, str] = onnx_class_names(cached) if cached.is_file() else self._read_names()

    def _read_names(self) -> dict[int, str]:
        from ultralytics.nn.autobackend import check_class_names

        model = self._load_network()
        names = check_class_names(model.names)  # older checkpoints hold a list, or str keys
        self._check_head(model, names)
        return names

    def _check_head(self, model, names: dict[int, str]) -> None:
        """Refuse a checkpoint whose head does not fit its class names (where the head says)."""

    def _load_network(self):
        """The checkpoint's model through ultralytics' own loader (fp32, eval, CPU, unfused)."""
        configure_ultralytics_offline()
        from ultralytics.nn.tasks import load_checkpoint

        model, _ = load_checkpoint(self.path, device="cpu", fuse=False)
        if getattr(model, "task", None) != self.task:
            raise ValueError(f"{self.path}: expected a YOLO {self.task_noun} checkpoint, got task {model.task!r}")
        return model

    def _export_head(self, model):
        """Prepare the loaded network's head as the ONNX export has it (before fusing)."""
        return model

    def torch_module(self):
        model = self._export_head(self._load_network()).fuse(verbose=False)  # Conv+BN folded, as in the export
        model.model[-1].export = True  # the head returns its output tensor alone, as the ONNX graph does
        for p in model.parameters():
            p.requires_grad_(False)
        return model.float().eval()

    def _onnx_target(self) -> Path:
        return self.path.with_name(derived_name(self.path, str(self.image_size), digest=self.sha256))

    def onnx_file(self) -> Path:
        return build_once(self._onnx_target(), self._export_onnx)

    def _export_onnx(self, tmp: Path) -> None:
        """Export with ultralytics' exporter into a private folder, then move the file to ``tmp``.

        The exporter always writes ``<checkpoint stem>.onnx`` beside the checkpoint it loaded; staging a link to
        the checkpoint in a folder of its own keeps replicas that export at once from writing the same file.
        """
        configure_ultralytics_offline()
        from ultralytics import YOLO

        logger.info("%s: exporting to ONNX at %d px (%s)", self.name, self.image_size, tmp.parent)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{self.path.stem}.export-", dir=self.path.parent) as folder:
            staged = Path(folder) / self.path.name
            try:
                os.link(self.path, staged)
            except OSError:  # filesystem without hard links
                shutil.copyfile(self.path, staged)
            exported = YOLO(staged, task=self.task).export(
                format="onnx",
                imgsz=self.image_size,
                dynamic=True,  # batch, height and width axes; the only way ultralytics makes the batch dynamic
                simplify=True,  # onnxslim; ultralytics logs and keeps the raw graph if slimming fails
                device="cpu",
            )
            pin_input_size(Path(exported), tmp, self.image_size)
        logger.info("%s: ONNX export took %.1f s", self.name, time.perf_counter() - started)



def onnx_class_names(path: Path) -> dict[int, str]:
    """The class names ultralytics' exporter writes into the ONNX metadata (``names``: a dict literal)."""
    import ast

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {prop.key: prop.value for prop in model.metadata_props}
    if "names" not in meta:
        raise ValueError(f"{path}: no class names in the ONNX metadata (not exported by ultralytics?)")
    return {int(k): str(v) for k, v in ast.literal_eval(meta["names"]).items()}


def pin_input_size(exported: Path, target: Path, size: int) -> None:
    """Write ``exported`` to ``target`` with its input fixed at ``(batch, 3, size, size)``.

    Every batch is letterboxed to ``size``, and TensorRT optimisation profiles (``festival_serve.runtime.tensorrt_engines``)
    accept a dynamic batch axis only; the anchors output axis follows from the input once it is fixed.
    """
    import onnx

    model = onnx.load(str(exported))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size  # replaces the symbolic "height"/"width"
    onnx.save(model, str(target))
