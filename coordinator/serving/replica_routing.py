"""Ray Serve request router for fedprefix's engine replicas: every request of a user goes to one replica.

Used by replicas.py (the engine deployment's `request_router_config`). It overrides two private
methods of Ray Serve 2.55's router (pyproject pins ray[serve] to 2.55; tests/coordinator/
test_replicas.py checks the behaviour on every upgrade).
"""

# No `from __future__ import annotations`, like replicas.py: Ray Serve imports this class by path.
import asyncio
import hashlib
import time
from typing import Any

from ray.serve.request_router import MultiplexMixin, RequestRouter

PLACED_FOR_S = 10.0  # how long the router remembers where it placed a new user, until a replica reports it


class UserAffinityRouter(MultiplexMixin, RequestRouter):
    """Ray Serve request router: every request of a user goes to one replica, the one that holds the
    user; a user no replica holds goes to the replica holding the fewest users (ties: rendezvous hashing).

    Two parts, because Ray decouples routing from requests: a routing task picks a replica for one
    pending request, then hands that replica to *a* pending request (_fulfill_next_pending_request).
    Ray's FIFOMixin (and its default router) then give it to the oldest request of the same model id,
    else to the oldest request of anyone: in a mixed burst a replica chosen for bob served alice,
    who then held two replicas. Here a replica chosen for a user goes only to a request of that user
    (an anonymous one only to an anonymous request), and is otherwise left unused.

    Ray's routing tasks do not all route a request of their own: a task that stops because there
    are more tasks than pending requests drops the request it had taken, and a task finding none
    routes "for nobody" (Ray's FIFO fallback then serves the oldest request). With strict matching
    such a request would wait forever and a task for nobody would spin, so a task with nothing
    queued takes the oldest request no other task is routing (_get_next_pending_request_to_route).

    Placement, per request: the holders of the user (as Ray's controller reports the replicas'
    multiplexed model ids) if any, one of them by rendezvous hashing when a burst left the user on
    several; else the replica this router last placed the user on, until the controller reports it
    (every 0.1 s); else the replica with the fewest users, counting those placed here but not yet
    reported, so that a burst of new users spreads over the replicas. A holder that is gone leaves
    the candidates once the controller or a failed probe notices; a full one makes its users wait
    (the engine answers 429 past its own queue)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._placed: dict[str, tuple[str, float]] = {}  # user -> (replica id, when), until reported
        self._routing_for: dict[asyncio.Task, Any] = {}  # routing task -> the request it routes

    async def choose_replicas(self, candidate_replicas: list, pending_request=None) -> list[list]:
        await asyncio.sleep(0)  # a routing task never holds the event loop, whatever it is routing
        user = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not user or len(candidate_replicas) < 2:
            return [list(candidate_replicas)]
        return [[self._place(user, candidate_replicas)]]  # no fallback rank: the user would spread

    def _place(self, user: str, candidates: list):
        holders = [r for r in candidates if user in r.multiplexed_model_ids]
        if holders:
            self._placed.pop(user, None)
            return max(holders, key=lambda r: _rendezvous(user, r.replica_id.unique_id))
        now = time.monotonic()
        by_id = {r.replica_id.unique_id: r for r in candidates}
        placed = self._placed.get(user)
        if placed is not None and placed[0] in by_id and now - placed[1] < PLACED_FOR_S:
            return by_id[placed[0]]
        for other in [u for u, (_, at) in self._placed.items() if now - at >= PLACED_FOR_S]:
            del self._placed[other]
        users = {rid: len(r.multiplexed_model_ids) for rid, r in by_id.items()}
        for other, (rid, _) in self._placed.items():
            if other != user and rid in users and other not in by_id[rid].multiplexed_model_ids:
                users[rid] += 1
        chosen = min(by_id, key=lambda rid: (users[rid], _rendezvous(user, rid)))
        self._placed[user] = (chosen, now)
        return by_id[chosen]

    def _get_next_pending_request_to_route(self):
        task = asyncio.current_task()
        request = super()._get_next_pending_request_to_route()
        if request is None:  # none queued: the oldest unfulfilled request no other task is routing
            taken = {id(r) for t, r in self._routing_for.items() if t is not task and t in self._routing_tasks}
            waiting = [r for r in self._pending_requests_to_fulfill if not r.future.done()]
            request = next((r for r in waiting if id(r) not in taken), waiting[0] if waiting else None)
        for gone in [t for t in self._routing_for if t not in self._routing_tasks]:
            del self._routing_for[gone]
        if task is not None:
            self._routing_for[task] = request
        return request

    def _fulfill_next_pending_request(self, replica, request_metadata=None) -> None:
        """Give the replica to the oldest waiting request of the same user (an anonymous request:
        itself, else the oldest anonymous one); with none waiting, the replica goes unused."""
        if request_metadata is None:
            return
        if request_metadata.multiplexed_model_id:
            request = self._get_pending_request_matching_multiplexed_model_id(request_metadata)
        else:
            request = self._get_pending_request_matching_internal_request_id(request_metadata)
            if request is None:
                anonymous = (r for r in self._pending_requests_to_fulfill if not r.metadata.multiplexed_model_id)
                request = next((r for r in anonymous if not r.future.done()), None)
        if request is not None:
            self._record_queue_wait_time(request)
            request.future.set_result(replica)
            self._remove_pending_request_from_indices(request)


def _rendezvous(user: str, replica: str) -> bytes:
    return hashlib.sha256(f"{replica}\0{user}".encode()).digest()
