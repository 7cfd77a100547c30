"""The ingress's request router: camera sockets go to the replica holding the fewest streams.

Serve's default router (power of two choices on queue length) suits requests that last milliseconds; a socket
lasts as long as its camera. Six sockets opened together against two ingress replicas landed five on one
(measured): the queue lengths the router probes are all zero at that instant. This router sends a WebSocket
request to the candidate with the fewest streams, counting the sockets it routed itself that are still open
(exact and immediate for one proxy) and what each replica last reported (``record_routing_stats``: every
stream, from every proxy's router); everything else goes through the default procedure.

``serve_config.yaml`` names it in the ingress's ``request_router_config``.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

logger = logging.getLogger("ray.serve")

#: A socket chosen but not routed within this long was cancelled (its client left): it no longer counts, seconds.
CHOOSING_EXPIRY_S = 10.0
#: The key of the ingress's routing stats that counts the streams it holds (``PipelineIngress.record_routing_stats``).
STREAMS_HELD = "streams_held"


def is_websocket(request: PendingRequest | None) -> bool:
    """Whether the proxy's request is a WebSocket. Its first argument is the pickled ASGI scope: looked for, not
    unpickled (a stray match only routes an HTTP request by streams held, which is harmless)."""
    if request is None or not request.args or not isinstance(request.args[0], bytes | bytearray):
        return False
    return b"websocket" in request.args[0][:4096]


class StreamBalancingRouter(PowerOfTwoChoicesRequestRouter):
    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self.open_sockets: collections.Counter[ReplicaID] = collections.Counter()  # routed here, not yet completed
        self.socket_replica: dict[str, ReplicaID] = {}  # internal request id -> replica
        # Sockets chosen for a replica but not yet routed (the probe is in flight): sockets opened together are
        # chosen before any of them is routed, so they must count at once. Request id -> (replica, when chosen).
        self.choosing: dict[str, tuple[ReplicaID, float]] = {}
        logger.info("ingress router: camera sockets go to the replica holding the fewest streams")

    def streams_held(self, replica: RunningReplica, excluding: str = "") -> int:
        reported = int((replica.routing_stats or {}).get(STREAMS_HELD, 0))
        choosing = sum(1 for request, (chosen, _) in self.choosing.items()
                       if chosen == replica.replica_id and request != excluding)
        return max(reported, self.open_sockets[replica.replica_id]) + choosing

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not is_websocket(pending_request) or not candidate_replicas:
            return await super().choose_replicas(candidate_replicas, pending_request)
        now, request = time.monotonic(), pending_request.metadata.internal_request_id
        for stale in [r for r, (_, at) in self.choosing.items() if now - at > CHOOSING_EXPIRY_S]:
            del self.choosing[stale]  # cancelled before it was routed
        # Fewest streams first (ties at random), then the rest in that order: a replica that cannot take it now (at
        # its max_ongoing_requests) hands it to the next.
        ranked = sorted(candidate_replicas, key=lambda r: (self.streams_held(r, excluding=request), random.random()))
        self.choosing[request] = (ranked[0].replica_id, now)
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        if is_websocket(pending_request):
            request = pending_request.metadata.internal_request_id
            self.choosing.pop(request, None)
            self.open_sockets[replica_id] += 1
            self.socket_replica[request] = replica_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        if self.socket_replica.pop(internal_request_id, None) is not None:
            self.open_sockets[replica_id] -= 1
            if self.open_sockets[replica_id] <= 0:
                del self.open_sockets[replica_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.open_sockets.pop(replica_id, None)
