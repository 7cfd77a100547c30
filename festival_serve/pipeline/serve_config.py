"""Rules of a Serve config that span its sections, checked before anything starts.

Batch sizes and waits come from each model deployment's ``user_config`` and nowhere else (Serve hands it
to ``reconfigure``); a model deployment without one would batch with whatever its decorator says, so it
is an error here, named with its fix. The reader's batch must also hold one frame's crops: Serve weighs a
request by its crop count and refuses one heavier than ``max_batch_size``. No Ray import: ``festival-serve
up`` and ``festival_serve.ops.manifests`` check a config with it before Ray starts or a manifest is written.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from festival_serve.pipeline.settings import BatchConfig, IngressSettings
from festival_serve.pipeline.stages import STAGES, stage

#: The application builder whose deployments these rules are about (the other applications are left alone).
PIPELINE_MODULE = "graphs.pipeline"
#: What every model deployment's ``user_config`` must name; the rest of ``BatchConfig`` has defaults.
REQUIRED_BATCH_KEYS = ("max_batch_size", "batch_wait_timeout_s")
_FIX = "user_config: {max_batch_size: N, batch_wait_timeout_s: SECONDS}"


def batch_config(deployment: str, user_config: Any) -> BatchConfig:
    """``user_config`` of the model deployment ``deployment`` as a ``BatchConfig``; a ValueError naming the
    deployment and the fix when it is missing, lacks a batch size or wait, or does not validate."""
    if not user_config:
        raise ValueError(f"{deployment}: no user_config; batch sizes and waits are read from it only: "
                         f"give the {deployment} deployment `{_FIX}` in the Serve config")
    if not isinstance(user_config, dict):
        raise ValueError(f"{deployment}: user_config must be a mapping like `{_FIX}`, got {type(user_config).__name__}")
    missing = [key for key in REQUIRED_BATCH_KEYS if key not in user_config]
    if missing:
        raise ValueError(f"{deployment}: user_config has no {' or '.join(missing)}: "
                         f"give the {deployment} deployment `{_FIX}` in the Serve config")
    try:
        return BatchConfig.model_validate(user_config)
    except ValidationError as e:
        raise ValueError(f"{deployment}: user_config is not valid ({_errors(e)})") from None


def check_serve_config(config: dict) -> None:
    """Raise one ValueError listing every broken rule of the pipeline applications in ``config`` (a Serve
    config as loaded from YAML): each model deployment listed with a full ``user_config``, and the reader's
    ``max_batch_size`` at least ``ingress.max_signs_read``."""
    problems = []
    for app in config.get("applications") or []:
        if str(app.get("import_path", "")).split(":")[0] != PIPELINE_MODULE:
            continue
        problems += _app_problems(app)
    if problems:
        raise ValueError("the Serve config cannot run the pipeline:\n  " + "\n  ".join(problems))


def _app_problems(app: dict) -> list[str]:
    listed = {d.get("name"): d for d in app.get("deployments") or []}
    problems, batches = [], {}
    for model in STAGES:
        if model.deployment not in listed:
            problems.append(f"{model.deployment}: not listed under the application's deployments, so it has no "
                            f"user_config: add `- name: {model.deployment}` with `{_FIX}`")
            continue
        try:
            batches[model.deployment] = batch_config(model.deployment, listed[model.deployment].get("user_config"))
        except ValueError as e:
            problems.append(str(e))
    reader = stage("sign_reader").deployment
    if reader in batches:
        try:
            signs_read = IngressSettings.model_validate((app.get("args") or {}).get("ingress") or {}).max_signs_read
        except ValidationError as e:
            return [*problems, f"args.ingress is not valid ({_errors(e)})"]
        if batches[reader].max_batch_size < signs_read:
            problems.append(
                f"{reader}: user_config.max_batch_size is {batches[reader].max_batch_size}, below "
                f"ingress.max_signs_read ({signs_read}): Serve weighs a frame by its crops and refuses one heavier "
                f"than a batch; raise {reader}'s max_batch_size to at least {signs_read} or lower "
                f"ingress.max_signs_read")
    return problems


def _errors(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
