"""Shapes of a festival day for ``festival-serve load``: the offered rate as a multiple of a measured
capacity, over a run compressed in time (a day in ~10 minutes).

A profile is a list of ``(t, multiple)`` points, ``t`` the fraction of the run (0 to 1), joined by
straight lines. The built-in ones:

- ``festival``: a morning ramp to 0.8× capacity, a steady afternoon, a surge to 4× when a show ends
  (a tenth of the run: one minute of a ten-minute run), the drain back, an evening lull at 0.15×;
- ``steady``: 1× throughout;
- ``ramp``: 0.1× rising to 3×;
- ``surge``: 0.5×, a jump to 5× for the middle fifth, then 0.5× again.

A custom profile is a JSON or YAML file ``{"points": [[t, multiple], …]}`` with ``t`` rising from 0 to 1.
No Ray import.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    name: str
    points: tuple[tuple[float, float], ...]  # (fraction of the run, multiple of capacity)

    def __post_init__(self) -> None:
        times = [t for t, _ in self.points]
        if len(self.points) < 2 or times[0] != 0 or times[-1] != 1 or times != sorted(times):
            raise ValueError(f"profile {self.name!r}: points must start at t=0, end at t=1 and rise in t")
        if any(m < 0 for _, m in self.points):
            raise ValueError(f"profile {self.name!r}: multiples must be >= 0")

    def multiple(self, fraction: float) -> float:
        """The offered rate at ``fraction`` of the run, as a multiple of capacity."""
        fraction = min(1.0, max(0.0, fraction))
        times = [t for t, _ in self.points]
        i = min(max(1, bisect.bisect_right(times, fraction)), len(times) - 1)
        (t0, m0), (t1, m1) = self.points[i - 1], self.points[i]
        return m0 if t1 == t0 else m0 + (m1 - m0) * (fraction - t0) / (t1 - t0)

    def rate(self, capacity_rps: float, duration_s: float):
        """Arrivals per second as a function of the seconds since the start."""
        return lambda seconds: capacity_rps * self.multiple(seconds / duration_s)

    def peak(self) -> float:
        return max(m for _, m in self.points)


BUILT_IN: dict[str, Profile] = {
    profile.name: profile for profile in (
        Profile("festival", ((0.0, 0.1), (0.2, 0.8), (0.5, 0.8), (0.53, 4.0), (0.63, 4.0), (0.68, 0.8),
                             (0.8, 0.6), (0.85, 0.15), (1.0, 0.15))),
        Profile("steady", ((0.0, 1.0), (1.0, 1.0))),
        Profile("ramp", ((0.0, 0.1), (1.0, 3.0))),
        Profile("surge", ((0.0, 0.5), (0.4, 0.5), (0.401, 5.0), (0.6, 5.0), (0.601, 0.5), (1.0, 0.5))),
    )
}


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or one from a JSON/YAML file."""
    if name_or_path in BUILT_IN:
        return BUILT_IN[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"unknown profile {name_or_path!r}: choose {', '.join(BUILT_IN)} or give a JSON/YAML file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    try:
        points = tuple((float(t), float(m)) for t, m in data["points"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected {{\"points\": [[t, multiple], ...]}} ({e})") from None
    return Profile(path.stem, points)
