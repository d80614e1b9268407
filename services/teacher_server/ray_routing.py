"""Ray Serve's request router for teacher replicas: an AnswerVJP goes where its graph is kept.

A trainer's step is Answer (with ``keep_graph``), then AnswerVJP naming the ``graph_id`` the
answer left. The graph lives in one replica's memory (``kept_graphs``), and Serve's default
router (power of two choices) sends the VJP to any replica: with two replicas half of the VJPs
missed (NOT_FOUND), were sent again in full, and left their graphs held until the TTL.

Each replica's graph ids start with its replica id (``KeptGraphs(owner=...)``), and the client
sends the graph id as the ``session_id`` gRPC metadata, which Serve's gRPC proxy hands to the
router. ``KeptGraphRouter`` sends such a call to that replica, waiting for it when it is busy;
every other call (Answer, Predict, Describe, a VJP with the full question) is routed as Serve
routes by default: the less loaded of two replicas drawn at random, local ones first. When the
owner is gone (scaled down, dead), the call goes to another replica, which answers NOT_FOUND,
and the client sends the full request: routing saves work and never changes a result.

Unlike Serve's default router, a replica found for one request goes to that request, not to
the oldest one waiting (Serve's ``FIFOMixin`` would hand the owner found for a VJP to whatever
request came first).
"""

from __future__ import annotations

import random

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

from .kept_graphs import graph_owner


class KeptGraphRouter(LocalityMixin, RequestRouter):
    """Power of two choices, except that an AnswerVJP naming a kept graph goes to its owner."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        owner = graph_owner(pending_request.metadata.session_id) if pending_request is not None else None
        if owner:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == owner:
                    pending_request.routing_context.should_backoff = True  # busy: wait for it, do not spin
                    return [[replica]]
        replicas = self.curr_replicas
        pool = [replicas[i] for i in self.apply_locality_routing(pending_request) if i in replicas]
        return [random.sample(pool, min(2, len(pool)))] if pool else []
