"""Fractional-GPU packing on a real multi-node Ray cluster on this machine (``festival_serve.ops.local_cluster``):
separate raylets advertising fake GPUs, the deployments' real ``num_gpus`` fractions from serve_config.yaml,
and placements read back from Ray's state API. The models are tiny stand-ins: what is under test is where
Ray puts them, not what they compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from festival_serve.ops import up
from festival_serve.ops import local_cluster
from festival_serve.runtime.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]


def _deployments() -> dict[str, dict]:
    config = up.load_config(ROOT / "serve_config.yaml")
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


@pytest.fixture(scope="module")
def one_gpu_cluster():
    """Head (no GPU) + one worker with one fake GPU; a second worker is added by the spill test."""
    import ray
    from ray import serve

    cluster = local_cluster.start_nodes(local_cluster.ClusterShape(workers=1, gpus_per_node=1, cpus_per_node=2,
                                                                   head_cpus=1, object_store_mb=128))
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False,
             runtime_env={"env_vars": dict(OFFLINE_ENV),
                          "worker_process_setup_hook": "festival_serve.runtime.offline.install_network_guard"})
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": 0})
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _deploy(replicas: int) -> dict[str, list]:
    """The graph's five deployments as stand-ins with serve_config.yaml's resources and ``replicas`` replicas
    of each model; returns what each model replica reports: (node id, GPU ids Ray gave it)."""
    import ray
    from ray import serve

    @serve.deployment
    class ModelStandIn:
        def where(self) -> tuple[str, list[str]]:
            context = ray.get_runtime_context()
            return context.get_node_id(), list(context.get_accelerator_ids().get("GPU", []))

    @serve.deployment
    class IngressStandIn:
        def __init__(self, **models) -> None:
            self.models = models

        async def where(self, replicas: int) -> dict[str, list]:
            out: dict[str, set] = {}
            for name, handle in self.models.items():  # enough calls to reach every replica (power of two choices)
                answers = [await handle.where.remote() for _ in range(replicas * 20)]
                out[name] = sorted({(node, tuple(gpus)) for node, gpus in answers})
            return out

    specs = _deployments()
    models = {name: ModelStandIn.options(name=name, ray_actor_options=spec["ray_actor_options"], num_replicas=replicas)
              .bind() for name, spec in specs.items() if spec["ray_actor_options"].get("num_gpus")}
    ingress = IngressStandIn.options(name="PipelineIngress",
                                     ray_actor_options=specs["PipelineIngress"]["ray_actor_options"]).bind(**models)
    handle = serve.run(ingress, name="packing", route_prefix=None)
    return handle.where.remote(replicas).result(timeout_s=120)


def test_one_replica_of_each_model_shares_one_fake_gpu_by_its_fraction(one_gpu_cluster):
    reported = _deploy(replicas=1)
    fractions = {name: spec["ray_actor_options"]["num_gpus"] for name, spec in _deployments().items()
                 if spec["ray_actor_options"].get("num_gpus")}
    assert set(reported) == set(fractions) == {"SignDetector", "HazardCells", "SignReader", "SceneDescriber"}
    replicas = local_cluster.placements()
    nodes = local_cluster.node_totals(replicas)
    gpu_node = next(n for n in nodes if n.gpus == 1)
    for name, fraction in fractions.items():
        mine = [r for r in replicas if r.deployment == name]
        assert len(mine) == 1 and mine[0].node_id == gpu_node.node_id
        assert mine[0].gpu == pytest.approx(fraction)  # Ray reserved exactly the configured share
        assert reported[name] == [(gpu_node.node_id, ("0",))]  # and handed the replica that node's GPU 0
    assert gpu_node.gpus_held == pytest.approx(sum(fractions.values()))  # 0.9 of one device
    assert not local_cluster.overcommitted(nodes)
    head = next(n for n in nodes if n.gpus == 0)
    assert not [r for r in replicas if r.node_id == head.node_id and r.gpu > 0]  # the head has no GPU to give
    assert any("GPU 0.9 of 1 held" in line for line in local_cluster.status_lines(replicas, nodes))


def test_added_replicas_spill_onto_the_next_node_and_no_gpu_is_overcommitted(one_gpu_cluster):
    _deploy(replicas=1)
    first = {r.deployment: r.node_id for r in local_cluster.placements() if r.gpu > 0}
    one_gpu_cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=128 * 1024 * 1024)
    one_gpu_cluster.wait_for_nodes()
    reported = _deploy(replicas=2)
    replicas = local_cluster.placements()
    nodes = local_cluster.node_totals(replicas)
    assert not local_cluster.overcommitted(nodes)
    assert all(n.gpus_held <= n.gpus + local_cluster.SHARE_EPSILON for n in nodes)
    gpu_nodes = {n.node_id for n in nodes if n.gpus > 0}
    assert len(gpu_nodes) == 2
    for name in first:
        mine = [r for r in replicas if r.deployment == name]
        assert len(mine) == 2
        assert {node for node, _ in reported[name]} <= gpu_nodes
    # A full set takes 0.9 of a device, so a second one cannot fit beside the first: every model but the
    # lightest (0.1, which fits the 0.1 left) must have a replica on the new node.
    new_node = (gpu_nodes - {next(iter(first.values()))}).pop()
    spilled = {r.deployment for r in replicas if r.node_id == new_node and r.gpu > 0}
    assert {"SignDetector", "SignReader", "SceneDescriber"} <= spilled
