"""fp16 copies of fp32 ONNX graphs: what TensorRT 11 builds fp16 engines from, and what ONNX Runtime
runs when a stage asks for fp16.

TensorRT 11 builds only strongly typed networks (no ``BuilderFlag.FP16``), so an fp16 engine needs an
fp16 graph; ONNX Runtime has no "run this fp32 graph in fp16" switch either. Both take the same
converted file: weights and activations in fp16, inputs and outputs kept float32
(``keep_io_types``), so callers feed and read float32 whatever the precision. NVIDIA's documented
route is ModelOpt AutoCast, which keeps numerically risky nodes in fp32; without it, the fp32→fp16
converter maintained inside onnxruntime (``onnxruntime.transformers.float16``, also published as
onnxconverter-common) does the conversion. The copy is cached next to the source by content hash.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from festival_serve.runtime.cache import build_once, derived_name
from festival_serve.runtime.errors import BackendUnavailable

logger = logging.getLogger(__name__)


def fp16_target(onnx_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the fp16 copy of ``onnx_path`` lives (named by the source's content hash)."""
    onnx_path = Path(onnx_path)
    folder = Path(cache_dir) if cache_dir is not None else onnx_path.parent
    return folder / derived_name(onnx_path, "fp16")


def fp16_onnx(onnx_path: Path, cache_dir: Path | None = None, say: Callable[[str], None] = logger.info) -> tuple[Path, str]:
    """The fp16 copy of ``onnx_path`` (made once, then cached) and the tool that made it."""
    import onnx

    onnx_path = Path(onnx_path)
    target = fp16_target(onnx_path, cache_dir)
    convert, tool = _converter(onnx_path)
    if not target.exists():
        say(f"converting {onnx_path.name} to fp16 with {tool}")
        build_once(target, lambda tmp: onnx.save(convert(), str(tmp)))
    return target, tool


def _converter(onnx_path: Path):
    """``(convert() -> ModelProto, tool name)``: ModelOpt AutoCast where installed, else onnxruntime's converter."""
    import onnx

    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision

        return (lambda: convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                                   keep_io_types=True)), "modelopt.onnx.autocast"
    except ImportError:
        pass
    float16 = _float16_module()
    return (lambda: float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True),
            f"{float16.__name__}.convert_float_to_float16")


def _float16_module():
    """onnxconverter-common's fp32→fp16 graph converter, or the copy maintained inside onnxruntime."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        try:
            from onnxruntime.transformers import float16
        except ImportError as e:
            raise BackendUnavailable(
                "no fp32→fp16 ONNX converter is installed (onnxruntime ships one; so do nvidia-modelopt and "
                "onnxconverter-common): install one of them, or set fp16: false"
            ) from e
    return float16


def graph_has_fp16(onnx_path: Path) -> bool:
    """Whether the graph already computes in fp16 (fp16 weights, fp16 inputs, or casts to fp16)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in graph.initializer):
        return True
    if any(v.type.tensor_type.elem_type == half for v in graph.input):
        return True
    return any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == half for a in node.attribute)
        for node in graph.node
    )
