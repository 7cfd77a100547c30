"""Batch sizes and waits come from each model deployment's ``user_config`` only: a Serve config without them,
or with a reader batch smaller than the signs read per frame, is refused with the deployment and the fix
named, by ``festival-serve up`` before Ray starts, by the cluster commands before a manifest is written,
and (for an empty ``user_config``) by the deployment's own ``reconfigure``."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from festival_serve.ops import manifests
from festival_serve.cli import main
from festival_serve.pipeline.serve_config import batch_config, check_serve_config
from deployments.base import ModelDeployment
from festival_serve.pipeline.stages import stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def without_user_config(config):
    del deployment(config, "HazardCells")["user_config"]


def empty_user_config(config):
    deployment(config, "SceneDescriber")["user_config"] = {}


def no_wait(config):
    del deployment(config, "SignDetector")["user_config"]["batch_wait_timeout_s"]


def not_listed(config):
    config["applications"][0]["deployments"].remove(deployment(config, "SignDetector"))


def reader_batch_too_small(config):
    deployment(config, "SignReader")["user_config"]["max_batch_size"] = 8  # ingress.max_signs_read: 16 by default


def more_signs_read_than_the_reader_batches(config):
    config["applications"][0]["args"]["ingress"]["max_signs_read"] = 64


def zero_batch(config):
    deployment(config, "HazardCells")["user_config"]["max_batch_size"] = 0


BROKEN = {
    without_user_config: r"HazardCells: no user_config.*give the HazardCells deployment `user_config: \{max_batch_size",
    empty_user_config: r"SceneDescriber: no user_config",
    no_wait: r"SignDetector: user_config has no batch_wait_timeout_s",
    not_listed: r"SignDetector: not listed under the application's deployments.*add `- name: SignDetector`",
    reader_batch_too_small: r"SignReader: user_config.max_batch_size is 8, below ingress.max_signs_read \(16\).*"
                            r"at least 16",
    more_signs_read_than_the_reader_batches: r"SignReader: user_config.max_batch_size is 32, below "
                                             r"ingress.max_signs_read \(64\)",
    zero_batch: r"HazardCells: user_config is not valid \(max_batch_size: Input should be greater than or equal to 1\)",
}


def broken(config: dict, breaks) -> dict:
    config = copy.deepcopy(config)
    breaks(config)
    return config


def test_the_shipped_serve_config_passes(config):
    check_serve_config(config)


@pytest.mark.parametrize("breaks", BROKEN, ids=[f.__name__ for f in BROKEN])
def test_a_broken_copy_fails_naming_the_deployment_and_the_fix(config, breaks):
    with pytest.raises(ValueError, match=BROKEN[breaks]):
        check_serve_config(broken(config, breaks))


def test_every_problem_is_listed_at_once(config):
    config = broken(broken(config, without_user_config), reader_batch_too_small)

    with pytest.raises(ValueError) as raised:
        check_serve_config(config)
    assert "HazardCells" in str(raised.value) and "SignReader" in str(raised.value)


def test_applications_other_than_the_pipeline_are_left_alone(config):
    config = broken(config, without_user_config)
    config["applications"][0]["import_path"] = "other.app:build"

    check_serve_config(config)


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_up_refuses_a_broken_config_before_starting_ray(tmp_path, config, capsys):
    path = write(tmp_path, broken(config, reader_batch_too_small))

    assert main(["up", "--config", str(path), "--dry-run", "--cpu"]) == 2  # a dry run would print it
    err = capsys.readouterr().err
    assert str(path) in err and "SignReader" in err and "ingress.max_signs_read" in err
    assert main(["up", "--config", str(write(tmp_path, config)), "--dry-run", "--cpu"]) == 0


@pytest.mark.parametrize("command", [["render", "--image", manifests.PLACEHOLDER_IMAGE],
                                     ["serve-config", "--model-store", "/models"]], ids=["render", "serve-config"])
def test_the_cluster_commands_refuse_a_broken_config_and_write_nothing(tmp_path, config, capsys, command):
    path, out = write(tmp_path, broken(config, without_user_config)), tmp_path / "out.yaml"

    assert manifests.main([*command, "--config", str(path), "--out", str(out)]) == 2
    assert "HazardCells: no user_config" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("user_config", [None, {}], ids=["none", "empty"])
def test_reconfigure_refuses_an_empty_user_config(user_config):
    from deployments.base import ModelDeployment

    replica = SimpleNamespace(STAGE=stage("sign_reader"))
    with pytest.raises(ValueError, match="SignReader: no user_config"):
        ModelDeployment.reconfigure(replica, user_config)


@pytest.mark.parametrize("deployment", ["SignReader", "SceneDescriber", "SignDetector"])
def test_reconfigure_applies_the_user_config_to_the_batched_method(deployment):
    """The reader and the describer are entered through a method that counts their load for the autoscaler, and
    batch behind it: the user_config must reach the ``@serve.batch`` method, whichever it is."""
    from graphs.pipeline import MODELS

    cls = next(model.func_or_class for model in MODELS if model.name == deployment)
    replica = object.__new__(cls)  # no model loaded: only the batching is under test
    ModelDeployment.reconfigure(replica, {"max_batch_size": 32, "batch_wait_timeout_s": 0.001})

    batched = getattr(replica, cls.BATCHED or cls.STAGE.method)
    assert (batched._get_max_batch_size(), batched._get_batch_wait_timeout_s()) == (32, 0.001)
    assert replica.batch_config == batch_config(deployment, {"max_batch_size": 32, "batch_wait_timeout_s": 0.001})
