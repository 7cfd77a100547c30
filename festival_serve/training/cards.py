"""Model cards: a Markdown page beside each trained checkpoint saying what it is, what it was trained
on, how to make it again, how long that took, and how well it did."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from festival_serve.runtime.environment import package_versions

_PACKAGES = ("torch", "torchvision", "ultralytics", "numpy")


def write_model_card(
    path: Path,
    *,
    title: str,
    model: str,
    data: str,
    seed: int,
    command: str,
    seconds: float,
    metrics: dict[str, Any],
    notes: str = "",
) -> Path:
    """Write ``path`` (e.g. ``models/hazard_cells/MODEL_CARD.md``) and return it.

    ``metrics`` may nest: scalars become rows of a table (nested keys joined with dots), lists (per-epoch
    histories) go into a JSON block at the end so nothing is lost."""
    scalars, blocks = _flatten(metrics)
    lines = [
        f"# Model card: {title}",
        "",
        f"- **Model:** {model}",
        f"- **Training data:** {data}",
        f"- **Seed:** {seed}",
        f"- **Training time:** {_duration(seconds)} ({seconds:.0f} s) on {_machine()}",
        f"- **Trained:** {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- **Software:** {_versions()}",
        "",
        "## Reproduce",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {_format(value)} |" for key, value in scalars.items()),
    ]
    for key, value in blocks.items():
        lines += ["", f"### {key}", "", "```json", *(json.dumps(item, ensure_ascii=False) for item in value), "```"]
    if notes:
        lines += ["", "## Notes", "", notes]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _flatten(metrics: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, list]]:
    scalars: dict[str, Any] = {}
    blocks: dict[str, list] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            inner_scalars, inner_blocks = _flatten(value, f"{name}.")
            scalars.update(inner_scalars)
            blocks.update(inner_blocks)
        elif isinstance(value, (list, tuple)):
            blocks[name] = list(value)
        else:
            scalars[name] = value
    return scalars, blocks


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.machine()}, {cores} CPU cores"


def _versions() -> str:
    installed = package_versions(_PACKAGES)
    return ", ".join([f"Python {platform.python_version()}", *(f"{name} {v}" for name, v in installed.items())])
