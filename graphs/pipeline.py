"""The festival-serve application: which deployment feeds which.

``graphs.pipeline:app`` is the graph with default settings; ``graphs.pipeline:build_app`` is Ray
Serve's typed application builder, fed by ``args:`` in ``serve_config.yaml``. Replicas, resources,
autoscaling and batch sizes come from that file, not from code.
"""

from ray.serve import Application

from deployments.hazard_cells import HazardCells
from deployments.ingress import PipelineIngress
from deployments.scene_describer import SceneDescriber
from deployments.sign_detector import SignDetector
from deployments.sign_reader import SignReader
from festival_serve.settings import PipelineArgs


def build_app(args: PipelineArgs) -> Application:
    store, gpu_only = args.model_store, args.gpu_only
    return PipelineIngress.bind(
        SignDetector.bind(args.sign_detector, store, gpu_only),
        HazardCells.bind(args.hazard_cells, store, gpu_only),
        SignReader.bind(args.sign_reader, store, gpu_only),
        SceneDescriber.bind(args.scene_describer, store, gpu_only),
        args.ingress,
    )


app = build_app(PipelineArgs())
