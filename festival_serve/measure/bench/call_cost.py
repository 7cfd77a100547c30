"""What one Ray Serve handle call costs in CPU, in the caller and in the replica, alone and grouped.

The number behind the ingress's few, large requests (``festival_serve.serving.coalesce``, docs/DESIGN.md): a no-op
deployment is called from another deployment, ``calls`` times with ``concurrency`` in flight, first one call
per Serve request, then ``group`` calls per request (the replica answers each). CPU seconds are read from
``/proc`` for both replica processes (Linux), so the figures are per call, whatever else the machine runs.

    uv run --frozen --extra cpu python -m festival_serve.measure.bench.call_cost [--calls 4000] [--group 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from festival_serve.ops.up import apply_local_ray_env

apply_local_ray_env()  # before Ray is imported: its workers then run this interpreter, not a uv-built copy

from ray import serve  # noqa: E402


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@serve.deployment(max_ongoing_requests=64)
class Echo:
    """The cheapest replica there is: each call's answer is a constant."""

    async def one(self, item: int) -> int:
        return 0

    async def many(self, items: list[int]) -> list[int]:
        return [0] * len(items)

    def pid(self) -> int:
        return os.getpid()


@serve.deployment(max_ongoing_requests=64)
class Caller:
    def __init__(self, echo) -> None:
        self.echo = echo

    def pid(self) -> int:
        return os.getpid()

    async def run(self, calls: int, group: int, concurrency: int) -> float:
        """``calls`` calls, ``group`` per Serve request, ``concurrency`` requests in flight → seconds taken."""
        slots = asyncio.Semaphore(concurrency)

        async def one_request() -> None:
            async with slots:
                if group == 1:
                    await self.echo.one.remote(0)
                else:
                    await self.echo.many.remote([0] * group)

        started = time.perf_counter()
        await asyncio.gather(*(one_request() for _ in range(calls // group)))
        return time.perf_counter() - started


async def measure(calls: int, group: int, concurrency: int) -> list[dict]:
    caller = serve.get_deployment_handle("Caller", "call-cost")
    echo = serve.get_deployment_handle("Echo", "call-cost")
    caller_pid, echo_pid = await caller.pid.remote(), await echo.pid.remote()
    rows = []
    for size in (1, group):
        await caller.run.remote(calls // 10, size, concurrency)  # warm-up
        before = process_cpu_s(caller_pid), process_cpu_s(echo_pid)
        seconds = await caller.run.remote(calls, size, concurrency)
        after = process_cpu_s(caller_pid), process_cpu_s(echo_pid)
        rows.append({"calls_per_request": size, "calls_per_s": calls / seconds,
                     "caller_cpu_ms_per_call": 1000 * (after[0] - before[0]) / calls,
                     "replica_cpu_ms_per_call": 1000 * (after[1] - before[1]) / calls})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per measurement (default: %(default)s)")
    parser.add_argument("--group", type=int, default=4, help="calls per request, second measurement (default: 4)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    options = parser.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.run(Caller.bind(Echo.bind()), name="call-cost", route_prefix=None)
        print(f"{options.calls} calls of a no-op deployment from another deployment, {options.concurrency} in flight")
        for row in asyncio.run(measure(options.calls, options.group, options.concurrency)):
            print(f"  {row['calls_per_request']} call(s) a request: {row['calls_per_s']:7.0f} calls/s, CPU per call "
                  f"{row['caller_cpu_ms_per_call']:.2f} ms in the caller, {row['replica_cpu_ms_per_call']:.2f} ms in "
                  "the replica")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
