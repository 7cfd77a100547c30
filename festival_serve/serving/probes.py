"""What ``/readyz`` and ``/v1/models`` answer from: every stage's ``model_info``, asked in the background about once
a second (``StageStates``), never once per probe. A load balancer, a Kubernetes probe and a dashboard polling
``/readyz`` then cost the models nothing: measured before, 16 clients polling it (four model calls each) took a normal
client's p95 from 0.12 s to 1.1 s. No Ray: the stages are asked through an async function the ingress hands in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping

logger = logging.getLogger(__name__)

#: Asks one stage for its ``model_info``; raises when no replica answers.
InfoCall = Callable[[], Awaitable[dict]]


class StageStates:
    """The last answer of every stage to ``model_info``, refreshed every ``refresh_s`` seconds by one background task
    (started by the first reader, on its event loop). A stage that did not answer within ``timeout_s`` reads
    ``{"ready": False, "error": "no replica answered"}``; what it raised goes to the log, not to clients."""

    def __init__(self, calls: Mapping[str, InfoCall], *, refresh_s: float, timeout_s: float) -> None:
        self.calls, self.refresh_s, self.timeout_s = dict(calls), refresh_s, timeout_s
        self.infos: dict[str, dict] = {}
        self.checked_at: float | None = None  # time.monotonic() of the last refresh
        self._task: asyncio.Task | None = None
        self._first: asyncio.Event | None = None
        self._failing: set[str] = set()  # stages whose failure was logged: logged once per failure, not per second

    async def current(self) -> dict[str, dict]:
        """The stages' last infos (waiting, on the very first call, for the first refresh)."""
        if self._task is None:
            self._first = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="stage-states")
        if self.checked_at is None:
            await self._first.wait()
        return self.infos

    def age_s(self) -> float | None:
        return None if self.checked_at is None else round(time.monotonic() - self.checked_at, 3)

    async def refresh(self) -> dict[str, dict]:
        """Ask every stage now (``/v1/models``, behind the keys and rate-limited, shows live counters), keeping the
        answers as the current state too."""
        names = list(self.calls)
        answers = await asyncio.gather(*(self._ask(name) for name in names))
        self.infos, self.checked_at = dict(zip(names, answers)), time.monotonic()
        return self.infos

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the loop must outlive any one refresh
                logger.exception("stage states: refresh failed")
            finally:
                if self._first is not None:
                    self._first.set()
            await asyncio.sleep(self.refresh_s)

    async def _ask(self, name: str) -> dict:
        try:
            info = await asyncio.wait_for(self.calls[name](), timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - report, don't fail, the probe
            if name not in self._failing:
                logger.warning("stage %s did not answer model_info: %s: %s", name, type(e).__name__, e)
                self._failing.add(name)
            return {"ready": False, "error": "no replica answered"}
        if name in self._failing:
            logger.info("stage %s answers model_info again", name)
            self._failing.discard(name)
        return info

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def readiness(infos: Mapping[str, dict], required: Iterable[str]) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Whether every required stage is ready, and each stage's state as ``/readyz`` shows it."""
    required = set(required)
    stages = {stage: {"ready": info.get("ready") is True, "required": stage in required,
                      "reason": not_ready_reason(info)} for stage, info in infos.items()}
    return all(state["ready"] for state in stages.values() if state["required"]), stages


def not_ready_reason(info: dict) -> str | None:
    """Why a stage is not ready, in words a probe may show: no file paths, no exception text."""
    if info.get("ready") is True:
        return None
    if "error" in info:  # no replica answered (``StageStates._ask``)
        return "no replica answered"
    return "model not loaded (weights missing)" if info.get("unavailable_reason") else "model not loaded"
