"""A randomly initialised YOLIC-M2 checkpoint, saved the way training scripts save one."""

from __future__ import annotations

from pathlib import Path

from festival_serve.models.hazard_cells.yolic import CellLayout, build_yolic_m2


def build_yolic_checkpoint(path: Path, layout: CellLayout, *, seed: int = 0, head_bias: float = -3.0,
                           wrap: str | None = None, prefix: str = "") -> Path:
    """Write a YOLIC-M2 state_dict to ``path``.

    ``head_bias`` is the classifier's bias logit: the default (-3, sigmoid 0.05) leaves most cells
    unflagged at threshold 0.5 with the random head's input-dependent part spreading some above it.
    ``wrap`` nests the state_dict under that key; ``prefix`` prepends to every key (``module.``)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_yolic_m2(layout)
        head = model.classifier[1]
        torch.nn.init.normal_(head.weight, std=0.05)
        torch.nn.init.constant_(head.bias, head_bias)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({wrap: state} if wrap else state, path)
    return path
