"""Export the detectors' (and a trained sign-text recognizer's) ONNX files before the replicas start, in a process of its own.

A replica that finds its export cached (keyed by the checkpoint's hash) never imports torch, so the
ONNX Runtime replicas stay ~500 MB smaller; doing the export here, in a short-lived process, keeps
torch out of them on the first start too. ``festival-serve up`` runs this before deploying.

    python -m festival_serve.ops.export_onnx --args args.json [--cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import NETWORKS

#: Backends that run the ONNX export (TensorRT builds its engines from it).
ONNX_BACKENDS = ("onnxruntime", "tensorrt")


def export_onnx(args: PipelineArgs, *, has_gpu: bool, progress=print) -> list[Path]:
    """Make sure every network that will run from ONNX has its export cached; return the files."""
    files = []
    for network in NETWORKS:
        settings = getattr(args, network.stage)  # a network runs under its stage's backend and device
        device = settings.device if settings.device != "auto" else ("cuda" if has_gpu else "cpu")
        # auto on a GPU runs torch, or TensorRT engines built ahead of time (`festival-serve engines build`).
        from_onnx = settings.backend in ONNX_BACKENDS or (settings.backend == "auto" and device == "cpu")
        weights = network.weights(settings)
        if not from_onnx or weights is None or not args.store_path(weights).is_file():
            continue
        files.append(network.source(args).onnx_file())
        progress(f"  {network.name}: ONNX export ready ({files[-1].name})")
    reader = args.sign_reader
    if reader.engine == "onnx" and reader.rec_model and reader.rec_model.endswith(".pt") \
            and args.store_path(reader.rec_model).is_file():
        from festival_serve.training.sign_reader import cached_onnx

        files.append(cached_onnx(args.store_path(reader.rec_model)))
        progress(f"  sign_reader recognizer: ONNX export ready ({files[-1].name})")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m festival_serve.ops.export_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", type=Path, required=True, help="the application's args (PipelineArgs) as JSON")
    parser.add_argument("--gpu", action="store_true", help="the replicas will see a GPU")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from festival_serve.runtime.offline import apply_offline_env, install_network_guard

    apply_offline_env()
    install_network_guard()
    args = PipelineArgs.model_validate(json.loads(options.args.read_text()))
    try:
        export_onnx(args, has_gpu=options.gpu)
    except (ValueError, FileNotFoundError) as e:
        # A broken checkpoint is reported by its replica when the graph starts; don't block the rest.
        print(f"  ONNX export skipped: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
