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
from festival_serve.pipeline.settings import PipelineArgs


#: The model deployments; each names its row of the stage table (``festival_serve.pipeline.stages``).
MODELS = (SignDetector, HazardCells, SignReader, SceneDescriber)


def build_app(args: PipelineArgs) -> Application:
    handles = {}
    for model in MODELS:
        stage = model.func_or_class.STAGE
        handles[stage.name] = model.bind(stage.settings(args), args.model_store, args.gpu_only)
    # The ingress gets one handle per stage, by name; every model reads the frame it puts in the object store.
    return PipelineIngress.bind(args.ingress, model_store=args.model_store, **handles)


app = build_app(PipelineArgs())
