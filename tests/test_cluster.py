"""The cluster configs stay true to serve_config.yaml: the KubeRay RayService embeds it unchanged
but for the model store and where Serve's proxy listens (behind the HAProxy sidecar), the committed manifest
never drifts from a fresh render, the four models fit on one GPU, and the cluster launcher config passes Ray's
own validation. Offline and fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from festival_serve.ops import front_proxy, manifests

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
RAYSERVICE = ROOT / "cluster" / "rayservice.yaml"
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
REGENERATE = (f"python -m festival_serve.ops.manifests render --config serve_config.yaml "
              f"--image {manifests.PLACEHOLDER_IMAGE} --out cluster/rayservice.yaml")
CLUSTER = ROOT / "cluster"
CLUSTER_README = ROOT / "cluster" / "README.md"
MODEL_NAMES = {"SignDetector", "HazardCells", "SignReader", "SceneDescriber"}


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.fixture(scope="module")
def manifest(serve_config) -> dict:
    return manifests.render_rayservice(serve_config, image=manifests.PLACEHOLDER_IMAGE,
                                       gpu_workers_min=manifests.DEFAULT_GPU_WORKERS_MIN, gpu_workers_max=4)


def deployments(config: dict) -> list[dict]:
    return [d for app in config["applications"] for d in app.get("deployments", [])]


def pods(manifest: dict) -> list[dict]:
    spec = manifest["spec"]["rayClusterConfig"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


# --- serve_config.yaml itself -------------------------------------------------------------------

def test_serve_config_validates_with_rays_deploy_schema(serve_config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    assert {d.name for app in schema.applications for d in app.deployments} >= MODEL_NAMES | {"PipelineIngress"}


def test_every_batch_fits_within_max_ongoing_requests(serve_config):
    # A replica never holds more than max_ongoing_requests requests (Ray's default is 5), so a
    # smaller cap than max_batch_size silently caps every batch.
    batched = [d for d in deployments(serve_config) if "max_batch_size" in (d.get("user_config") or {})]
    assert {d["name"] for d in batched} == MODEL_NAMES
    for d in batched:
        assert d["max_ongoing_requests"] >= d["user_config"]["max_batch_size"], d["name"]


def test_one_replica_of_every_model_fits_on_one_gpu(serve_config):
    gpus = {d["name"]: d["ray_actor_options"].get("num_gpus", 0) for d in deployments(serve_config)}
    assert all(gpus[name] > 0 for name in MODEL_NAMES), gpus
    assert sum(gpus.values()) <= 1.0, gpus
    assert manifests.gpu_demand(serve_config).replica_set == pytest.approx(sum(gpus.values()))


# --- the RayService -----------------------------------------------------------------------------

def test_serve_config_v2_is_serve_config_with_only_the_model_store_and_the_proxy_address_changed(manifest, serve_config):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert [app["args"]["model_store"] for app in embedded["applications"]] == ["/models"]
    # Serve's proxy on the pod's loopback, one port up: only the HAProxy sidecar reaches it.
    assert embedded["http_options"] == {**serve_config["http_options"], "host": "127.0.0.1",
                                        "port": front_proxy.CLUSTER_SERVE_PORT}
    assert embedded == manifests.behind_front_proxy(manifests.with_model_store(serve_config, "/models"))
    for app in embedded["applications"]:
        app["args"]["model_store"] = "models"
    embedded["http_options"] = serve_config["http_options"]
    assert embedded == serve_config


def test_the_manifest_is_a_rayservice_with_autoscaling_and_token_auth(manifest):
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    spec = manifest["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == manifests.RAY_VERSION
    assert spec["authOptions"] == {"mode": "token", "secretName": "festival-serve-ray-token"}


def test_ray_version_is_the_installed_ray():
    from importlib.metadata import version

    assert manifests.RAY_VERSION == version("ray")


def test_the_head_runs_no_replicas_and_gpu_workers_autoscale(manifest):
    spec = manifest["spec"]["rayClusterConfig"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    [workers] = spec["workerGroupSpecs"]
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (2, 2, 4)
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1


def test_gpu_workers_can_hold_every_deployment_at_max_replicas(manifest, serve_config):
    [workers] = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    cpus = float(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    demand = manifests.gpu_demand(serve_config)
    assert demand.at_max_replicas <= workers["maxReplicas"] * gpus
    assert all(d["ray_actor_options"].get("num_cpus", 1) <= cpus for d in deployments(serve_config))


def test_every_pod_mounts_the_writable_model_store_and_sets_no_offline_env(manifest):
    for pod in pods(manifest):
        assert pod["volumes"][0] == {"name": "model-store", "persistentVolumeClaim": {"claimName": "festival-models"}}
        container = pod["containers"][0]  # Ray's: KubeRay takes the first container for it
        assert container["image"] == manifests.PLACEHOLDER_IMAGE
        assert container["volumeMounts"] == [{"name": "model-store", "mountPath": "/models"}]  # no readOnly
        assert "env" not in container  # weights are pre-pulled into the volume; no HF_HUB_OFFLINE & co


def test_the_committed_manifest_equals_a_fresh_render(tmp_path):
    fresh = tmp_path / "rayservice.yaml"
    assert manifests.main(["render", "--config", str(SERVE_CONFIG), "--image", manifests.PLACEHOLDER_IMAGE,
                         "--out", str(fresh)]) == 0
    assert RAYSERVICE.read_text() == fresh.read_text(), f"cluster/rayservice.yaml is stale; regenerate it: {REGENERATE}"


def test_the_committed_manifest_keeps_serve_config_v2_a_literal_block():
    text = RAYSERVICE.read_text()
    assert text.startswith("# GENERATED from serve_config.yaml")
    assert "  serveConfigV2: |\n    proxy_location: EveryNode\n" in text
    configmap, rayservice = yaml.safe_load_all(text)
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert rayservice == manifests.render_rayservice(
        config, image=manifests.PLACEHOLDER_IMAGE, gpu_workers_min=manifests.DEFAULT_GPU_WORKERS_MIN, gpu_workers_max=4)
    assert configmap == manifests.front_proxy_configmap(config, name="festival-serve", source="serve_config.yaml")


# --- the front proxy sidecar ----------------------------------------------------------------------

def test_every_pod_with_a_serve_proxy_runs_the_haproxy_sidecar_on_the_serve_services_port(manifest, serve_config):
    assert manifests.proxies_on_workers(serve_config)  # proxy_location EveryNode: the workers' proxies serve too
    for pod in pods(manifest):
        ray, sidecar = pod["containers"]
        assert sidecar["image"] == manifests.FRONT_PROXY_IMAGE == "haproxy:2.6"  # the official image
        assert sidecar["ports"] == [{"containerPort": front_proxy.CLUSTER_LISTEN_PORT, "name": "http"}]
        assert not [p for p in ray.get("ports", []) if p["name"] == "serve" or p["name"].startswith("serve-")]
        [mount] = sidecar["volumeMounts"]
        assert mount["readOnly"] and sidecar["command"][-1] == f"{mount['mountPath']}/haproxy.cfg"
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        paths = {item["path"] for item in volume["configMap"]["items"]}
        assert paths == set(front_proxy.cluster_files(serve_config)), "the pod must see the files as cluster/ holds them"
    # The Service KubeRay makes for Serve points at HAProxy's port; Serve's own (8001, loopback) is in no Service.
    assert manifest["spec"]["serveService"]["spec"]["ports"] == [
        {"name": "serve", "port": front_proxy.CLUSTER_LISTEN_PORT, "targetPort": front_proxy.CLUSTER_LISTEN_PORT}]


def test_a_changed_front_proxy_config_changes_the_pod_templates(serve_config):
    """HAProxy reads its config once: a new config must come with new pods (KubeRay rolls out a new cluster)."""
    def annotations(config):
        rendered = manifests.render_rayservice(config, image="img", gpu_workers_min=1, gpu_workers_max=2)
        return [pod_template["metadata"]["annotations"][manifests.FRONT_PROXY_DIGEST_ANNOTATION]
                for pod_template in [rendered["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]]]

    changed = manifests.with_model_store(serve_config, "/models")
    changed["applications"][0]["args"]["ingress"] = {**changed["applications"][0]["args"]["ingress"], "max_budget_s": 20}
    assert annotations(serve_config) != annotations(changed)


def test_the_sidecar_is_only_on_the_head_when_serve_runs_a_proxy_there_only(serve_config):
    head_only = {**serve_config, "proxy_location": "HeadOnly"}
    rendered = manifests.render_rayservice(head_only, image="img", gpu_workers_min=1, gpu_workers_max=2)
    head, worker = pods(rendered)
    assert [c["name"] for c in head["containers"]] == ["ray-head", manifests.FRONT_PROXY_CONTAINER]
    assert [c["name"] for c in worker["containers"]] == ["ray-worker"]


def test_the_committed_front_proxy_files_equal_a_fresh_render(serve_config):
    committed = {str(p.relative_to(CLUSTER)): p.read_text() for p in
                 [CLUSTER / front_proxy.CONFIG_NAME, *sorted((CLUSTER / front_proxy.ERRORS_DIR).glob("*"))]}
    assert committed == front_proxy.cluster_files(serve_config), \
        f"cluster/haproxy.cfg or cluster/haproxy-errors/ is stale; regenerate: {manifests.FRONT_PROXY_COMMAND}"


@pytest.mark.parametrize("options, message", [
    ({"gpu_workers_min": 3, "gpu_workers_max": 2}, "gpu_workers_min <= gpu_workers_max"),
    ({"gpu_workers_min": 0, "gpu_workers_max": 0}, "max >= 1"),
    ({"gpus_per_worker": 0}, "gpus_per_worker"),
    ({"model_store_mount": "models"}, "absolute"),
])
def test_render_refuses_clusters_that_cannot_work(serve_config, options, message):
    kwargs = {"image": "img", "gpu_workers_min": 1, "gpu_workers_max": 2} | options
    with pytest.raises(ValueError, match=message):
        manifests.render_rayservice(serve_config, **kwargs)


def test_render_refuses_a_replica_larger_than_a_worker(serve_config):
    big = manifests.with_model_store(serve_config, "/models")
    deployments(big)[0]["ray_actor_options"]["num_gpus"] = 2
    with pytest.raises(ValueError, match="asks for 2.0 GPUs"):
        manifests.render_rayservice(big, image="img", gpu_workers_min=1, gpu_workers_max=2)


def test_serve_config_command_writes_an_absolute_model_store(tmp_path, serve_config):
    out = tmp_path / "serve_config.cluster.yaml"
    assert manifests.main(["serve-config", "--config", str(SERVE_CONFIG), "--model-store", "/home/ubuntu/models",
                         "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == manifests.with_model_store(serve_config, "/home/ubuntu/models")
    assert manifests.main(["serve-config", "--config", str(SERVE_CONFIG), "--model-store", "models",
                         "--out", str(out)]) == 2


# --- the Ray cluster launcher config ------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_config_passes_rays_validation(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert launcher["head_node_type"] in launcher["available_node_types"]
    validate_config(prepare_config(launcher))  # Ray's schema plus its min/max worker checks


def test_launcher_head_runs_no_replicas_and_workers_bring_a_gpu(launcher, serve_config):
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    [worker] = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert worker["resources"]["GPU"] >= 1
    assert worker["min_workers"] >= 1
    assert manifests.gpu_demand(serve_config).at_max_replicas <= worker["max_workers"] * worker["resources"]["GPU"]
    assert worker["max_workers"] <= launcher["max_workers"]


def test_launcher_installs_the_locked_environment_with_token_auth(launcher):
    assert any("uv sync --frozen --extra gpu --extra tensorrt" in c for c in launcher["setup_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in launcher["initialization_commands"])
    assert "/home/ubuntu/.ray/auth_token" in launcher["file_mounts"]
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        assert "festival-serve/.venv/bin/ray " in command  # the locked Ray, not whatever the image has


# --- resource numbers generated into the hand-written docs -----------------------------------------

SMALL_CONFIG = {"applications": [{"name": "app", "import_path": "x:y", "deployments": [
    {"name": "Model", "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.3},
     "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}},
    {"name": "Front", "ray_actor_options": {"num_cpus": 0.25}, "num_replicas": 2},
]}]}
SMALL_WORKER = manifests.WorkerNode("g5.xlarge", cpus=4, gpus=1)


def test_resource_demand_of_a_small_config():
    demand = manifests.resource_demand(SMALL_CONFIG)
    assert demand.deployments == (manifests.DeploymentDemand("Model", 0.5, 0.3, 3, min_replicas=1),
                                  manifests.DeploymentDemand("Front", 0.25, 0.0, 2, min_replicas=2))  # fixed: 2 always
    assert [d.name for d in demand.models] == ["Model"] and [d.name for d in demand.cpu_only] == ["Front"]
    assert demand.replica_set(demand.models) == (0.5, 0.3)
    assert demand.replica_set() == (0.75, 0.3)
    assert demand.at_max_replicas() == (2.0, 0.9)  # 3 x 0.5 + 2 x 0.25 CPU; 3 x 0.3 GPU
    assert demand.at_min_replicas() == (1.0, 0.3)  # 0.5 + 2 x 0.25 CPU
    assert manifests.gpu_demand(SMALL_CONFIG) == manifests.GpuDemand(0.3, 0.9, 0.3)
    assert manifests.workers_needed(demand, SMALL_WORKER) == 1
    assert manifests.workers_needed(demand, manifests.WorkerNode("small", cpus=1, gpus=1)) == 2  # CPU-bound
    assert manifests.workers_needed(demand, manifests.WorkerNode("small", cpus=1, gpus=1), at="min") == 1


def test_resource_demand_uses_serves_defaults_and_adds_fractions_exactly():
    config = {"applications": [{"deployments": [
        {"name": "Bare"},  # Serve gives a replica 1 CPU and no GPU, and one replica
        *({"name": f"M{gpus}", "ray_actor_options": {"num_cpus": 0.1, "num_gpus": gpus}} for gpus in (0.2, 0.1, 0.2, 0.4)),
    ]}]}
    demand = manifests.resource_demand(config)
    assert demand.deployments[0] == manifests.DeploymentDemand("Bare", 1.0, 0.0, 1)
    assert demand.replica_set(demand.models) == (0.4, 0.9)  # not 0.9000000000000001
    assert manifests.workers_needed(demand, SMALL_WORKER) == 1


def test_generated_blocks_of_a_small_config():
    demand = manifests.resource_demand(SMALL_CONFIG)
    yaml_block = "\n".join(manifests.render_launcher_block(demand, SMALL_WORKER, "small.yaml"))
    assert "#   Model  0.5 CPU + 0.3 GPU, up to 3\n#   Front  0.25 CPU, up to 2" in yaml_block
    flat = " ".join(line.lstrip("# ") for line in yaml_block.splitlines())
    assert "one replica of each model takes 0.5 CPU + 0.3 GPU, leaving 3.5 CPU and 0.7 GPU" in flat
    assert "room for 14 Front replicas (0.25 CPU each)" in flat
    assert "asks for 2 CPU + 0.9 GPU: at least 1 such workers" in flat
    markdown = manifests.render_readme_block(demand, SMALL_WORKER, "small.yaml")
    assert "| `Model` | 0.5 | 0.3 | 3 | 1.5 | 0.9 |" in markdown
    assert "| every deployment at `max_replicas` | | | | 2 | 0.9 |" in markdown
    too_big = manifests.render_launcher_block(demand, manifests.WorkerNode("tiny", cpus=0.25, gpus=1), "small.yaml")
    assert "does not fit on one tiny worker" in " ".join(too_big)


def test_the_committed_resource_numbers_equal_a_fresh_render(serve_config):
    launcher, readme = manifests.render_docs(serve_config, LAUNCHER.read_text(), CLUSTER_README.read_text())
    assert LAUNCHER.read_text() == launcher, f"cluster/ray-cluster.yaml is stale; regenerate it: {manifests.DOCS_COMMAND}"
    assert CLUSTER_README.read_text() == readme, f"cluster/README.md is stale; regenerate it: {manifests.DOCS_COMMAND}"


def test_docs_command_checks_and_rewrites_only_the_generated_regions(tmp_path, capsys):
    launcher, readme = tmp_path / "ray-cluster.yaml", tmp_path / "README.md"
    stale = LAUNCHER.read_text().replace("# END GENERATED resources", "#   9 CPU + 9 GPU\n    # END GENERATED resources")
    launcher.write_text(stale)
    readme.write_text(CLUSTER_README.read_text())
    args = ["docs", "--config", str(SERVE_CONFIG), "--launcher", str(launcher), "--readme", str(readme)]
    assert manifests.main(args + ["--check"]) == 1
    err = capsys.readouterr().err
    assert f"{launcher}: generated resource numbers are stale; regenerate: {manifests.DOCS_COMMAND}" in err
    assert str(readme) not in err
    assert launcher.read_text() == stale  # --check writes nothing
    assert manifests.main(args) == 0
    assert launcher.read_text() == LAUNCHER.read_text() and readme.read_text() == CLUSTER_README.read_text()
    assert manifests.main(args + ["--check"]) == 0


def test_docs_command_refuses_a_file_without_its_region(tmp_path):
    launcher, readme = tmp_path / "ray-cluster.yaml", tmp_path / "README.md"
    launcher.write_text(LAUNCHER.read_text())
    readme.write_text("# no region here\n")
    assert manifests.main(["docs", "--config", str(SERVE_CONFIG), "--launcher", str(launcher),
                         "--readme", str(readme)]) == 2
    assert readme.read_text() == "# no region here\n"


def test_generated_regions_keep_the_launcher_config_yaml(launcher):
    text = LAUNCHER.read_text()
    assert text.count(manifests.BEGIN_MARKER) == text.count(manifests.END_MARKER) == 1
    assert launcher["available_node_types"]["ray.worker.gpu"]["resources"] == {"CPU": 4, "GPU": 1}
    assert manifests.launcher_worker(launcher) == manifests.WorkerNode("g5.xlarge", 4.0, 1.0)


# -- against KubeRay's own schema (the CRD vendored in cluster/crd/) -------------------------------------------


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    return manifests.rayservice_schema()


def test_vendored_crd_is_the_pinned_release():
    import gzip
    import hashlib
    import re

    pinned = re.search(r"sha256 of the uncompressed YAML: `([0-9a-f]{64})`",
                       (ROOT / "cluster" / "crd" / "README.md").read_text()).group(1)
    assert hashlib.sha256(gzip.open(manifests.RAYSERVICE_CRD).read()).hexdigest() == pinned


def test_committed_rayservice_is_valid_against_the_kuberay_crd(rayservice_schema):
    documents = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d and d.get("kind") == "RayService"]
    assert len(documents) == 1
    assert manifests.manifest_errors(documents[0], rayservice_schema) == []


def test_schema_check_catches_wrong_types_and_misspelt_fields(manifest, rayservice_schema):
    import copy

    broken = copy.deepcopy(manifest)
    head = broken["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")  # misspelt: the API server would drop it silently
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    errors = manifests.manifest_errors(broken, rayservice_schema)
    assert any("headGroupSpec.rayStartParam: not a field" in e for e in errors)
    assert any("maxReplicas" in e and "integer" in e for e in errors)


def test_upgrades_keep_serving_blue_green_with_the_old_cluster_kept_past_every_budget():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    spec = manifests.render_rayservice(config, image=manifests.PLACEHOLDER_IMAGE, gpu_workers_min=1,
                                     gpu_workers_max=4)["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    app = config["applications"][0]
    assert spec["rayClusterDeletionDelaySeconds"] > app["args"]["ingress"]["max_budget_s"]
    for deployment in app["deployments"]:  # Serve's in-place rolling update: new replica first, old one drains
        assert deployment["max_surge_percent"] == 100, deployment["name"]
        assert deployment["graceful_shutdown_timeout_s"] > app["args"]["ingress"]["max_budget_s"], deployment["name"]


def test_the_gpu_workers_always_up_hold_every_deployment_at_min_replicas():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    worker = manifests.launcher_worker(launcher)
    needed = manifests.workers_needed(manifests.resource_demand(config), worker, at="min")
    assert manifests.DEFAULT_GPU_WORKERS_MIN >= needed
    assert launcher["available_node_types"]["ray.worker.gpu"]["min_workers"] >= needed
