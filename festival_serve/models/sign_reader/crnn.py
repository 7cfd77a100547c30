"""The Vietnamese sign-text recognizer the reader serves as its ``rec_model``: a CRNN (Shi, Bai & Yao, "An
End-to-End Trainable Neural Network for Image-based Sequence Recognition", 2015), its checkpoint format and
its ONNX export.

A VGG-style convolution stack pools the 48-pixel height to 1 and the width by 4, a two-layer bidirectional
LSTM and a per-step linear layer give the CTC classes (``charset``: blank, the dictionary, the space),
narrowed to ~1.3 M parameters for two CPU cores. Exported, it has the I/O of PP-OCR's recognizer: input
``(N, 3, 48, W)`` float32 BGR in [-1, 1], output ``(N, W // 4, classes)`` softmax, the dictionary in the
ONNX metadata (``character``). Trained by ``festival_serve.training.sign_reader``; torch is imported only to
build, load or export, so a replica serving a cached export never imports it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from festival_serve.models.sign_reader import charset
from festival_serve.runtime.cache import build_once, derived_name, write_atomic

logger = logging.getLogger(__name__)



HEIGHT = 48  # the recognizer's input height (SignReaderSettings.rec_height)


WIDTH_STRIDE = 4  # input columns per output step


FORMAT = "festival-serve/sign-text-crnn/1"


def _torch():
    import torch

    return torch


@dataclass(frozen=True)
class CRNNConfig:
    #: Channels of the seven convolutions (CRNN's VGG stack: 64-128-256-256-512-512-512, narrowed).
    channels: tuple[int, ...] = (32, 48, 96, 96, 128, 128, 192)
    hidden: int = 128  # LSTM units per direction
    num_classes: int = charset.NUM_CLASSES


def build_crnn(config: CRNNConfig = CRNNConfig()):
    """CRNN for ``(N, 3, 48, W)`` inputs -> ``(N, W // 4, num_classes)`` logits."""
    torch = _torch()
    nn = torch.nn

    def conv(cin: int, cout: int, kernel=3, padding=1):
        return [nn.Conv2d(cin, cout, kernel, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    class CRNN(nn.Module):
        def __init__(self, cfg: CRNNConfig) -> None:
            super().__init__()
            c = cfg.channels
            self.config = cfg
            # Height 48 -> 24 -> 12 -> 6 -> 3 -> 1; width / 4 (the 2x1 pools keep the width, as CRNN's do,
            # so narrow letters keep steps of their own).
            self.features = nn.Sequential(
                *conv(3, c[0]), nn.MaxPool2d(2, 2),
                *conv(c[0], c[1]), nn.MaxPool2d(2, 2),
                *conv(c[1], c[2]), *conv(c[2], c[3]), nn.MaxPool2d((2, 1), (2, 1)),
                *conv(c[3], c[4]), *conv(c[4], c[5]), nn.MaxPool2d((2, 1), (2, 1)),
                *conv(c[5], c[6], kernel=(3, 1), padding=0),
            )
            self.rnn = nn.LSTM(c[6], cfg.hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(2 * cfg.hidden, cfg.num_classes)

        def forward(self, x):  # (N, 3, 48, W) -> (N, T, classes) logits
            f = self.features(x).squeeze(2).permute(0, 2, 1)  # (N, T, C)
            return self.head(self.rnn(f)[0])

    return CRNN(config)


def build_recognizer(crnn):
    """The exported network: CRNN logits -> per-step probabilities, as PP-OCR's recognizer outputs."""
    torch = _torch()

    class PPOCRRecognizer(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):  # (N, 3, 48, W) float32 BGR in [-1, 1] -> (N, W // 4, classes) softmax
            return torch.softmax(self.model(x), dim=-1)

    return PPOCRRecognizer(crnn).eval()


def save_checkpoint(model, path: Path, **extra: Any) -> Path:
    torch = _torch()
    checkpoint = {"format": FORMAT, "config": asdict(model.config), "dictionary": list(charset.DICTIONARY),
                  "model": model.state_dict(), **extra}
    return write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: Path):
    """A ``save_checkpoint`` file -> (CRNN in eval mode, the checkpoint dict); refuses another dictionary."""
    torch = _torch()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sign-text checkpoint (format {ckpt.get('format')!r})")
    if tuple(ckpt["dictionary"]) != charset.DICTIONARY:
        raise ValueError(f"{path}: trained over another dictionary ({len(ckpt['dictionary'])} characters, "
                         f"this one has {len(charset.DICTIONARY)})")
    config = CRNNConfig(**{**ckpt["config"], "channels": tuple(ckpt["config"]["channels"])})
    model = build_crnn(config)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def write_onnx(model, path: Path) -> None:
    """The recognizer as ONNX at ``path``: dynamic batch and width, the dictionary in its ``character``
    metadata (what ``festival_serve.models.sign_reader.reader`` reads when no ``rec_dict`` is set)."""
    import warnings

    import onnx

    torch = _torch()
    recognizer = build_recognizer(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and LSTM batch notes
        # dynamo=False: the dynamo exporter needs onnxscript (not installed); the TorchScript one exports
        # the LSTM with dynamic batch and sequence axes.
        torch.onnx.export(recognizer, (torch.zeros(1, 3, HEIGHT, 320),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["softmax"],
                          dynamic_axes={"x": {0: "batch", 3: "width"}, "softmax": {0: "batch", 1: "steps"}})
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "character", "\n".join(charset.DICTIONARY)
    onnx.save(proto, str(path))


def onnx_export_path(checkpoint: Path) -> Path:
    """Where ``checkpoint``'s export is cached: beside it, keyed by its bytes (``vi_rec.<sha12>.onnx``), so a
    retrained checkpoint never serves a stale export."""
    return checkpoint.with_name(derived_name(checkpoint))


def cached_onnx(checkpoint: Path) -> Path:
    """``checkpoint``'s ONNX export, made once (``festival-serve up`` makes it before the replicas start, so
    an ONNX Runtime replica reading a cached export never imports torch)."""
    target = onnx_export_path(Path(checkpoint))
    if target.is_file():
        return target
    model, _ = load_checkpoint(Path(checkpoint))
    logger.info("exporting %s to ONNX (%s)", checkpoint, target.name)
    return build_once(target, lambda tmp: write_onnx(model, tmp))
