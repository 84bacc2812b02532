"""A bounded job queue, fair across clients.

Jobs wait in one FIFO per `client_id`; `pop` serves the clients round-robin, so
one artist's 20-job batch does not starve another artist's single job: the
single job waits for at most one job of every other client.  Only the network
loop thread touches the queue (no locking).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The whole queue holds `max_queue` jobs."""


class ClientOverLimit(Exception):
    """This client already has `max_per_client` jobs queued or running."""


class FairQueue(Generic[T]):
    def __init__(self, max_queue: int, max_per_client: int) -> None:
        self.max_queue = max_queue
        self.max_per_client = max_per_client
        # client_id -> its waiting jobs; the dict order is the round-robin order
        # (the client served last moves to the end).
        self._lanes: OrderedDict[str, deque[tuple[str, T]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def count(self, client_id: str) -> int:
        lane = self._lanes.get(client_id)
        return len(lane) if lane else 0

    def push(self, client_id: str, job_id: str, item: T, already_running: int = 0) -> None:
        """Queue `item`; `already_running` counts this client's running jobs towards its cap."""
        if self._size >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); try again later")
        if self.count(client_id) + already_running >= self.max_per_client:
            raise ClientOverLimit(
                f"this client already has {self.max_per_client} jobs queued or running; "
                "wait for some to finish"
            )
        self._lanes.setdefault(client_id, deque()).append((job_id, item))
        self._size += 1

    def pop(self) -> tuple[str, T] | None:
        """The next job in round-robin order, or None when empty."""
        for client_id in self._lanes:
            lane = self._lanes[client_id]
            job_id, item = lane.popleft()
            self._size -= 1
            # Served: this client goes to the back of the rotation (or leaves it).
            del self._lanes[client_id]
            if lane:
                self._lanes[client_id] = lane
            return job_id, item
        return None

    def remove(self, job_id: str) -> T | None:
        for client_id, lane in self._lanes.items():
            for entry in lane:
                if entry[0] == job_id:
                    lane.remove(entry)
                    self._size -= 1
                    if not lane:
                        del self._lanes[client_id]
                    return entry[1]
        return None

    def order(self) -> Iterator[str]:
        """Job ids in the order `pop` would return them (if nothing else arrives)."""
        lanes = [list(lane) for lane in self._lanes.values()]
        depth = 0
        while True:
            emitted = False
            for lane in lanes:
                if depth < len(lane):
                    emitted = True
                    yield lane[depth][0]
            if not emitted:
                return
            depth += 1

    def position(self, job_id: str) -> int:
        """1-based place in line (1: next to run), -1 when not queued."""
        for i, jid in enumerate(self.order(), start=1):
            if jid == job_id:
                return i
        return -1

    def items(self) -> Iterator[tuple[str, T]]:
        for lane in self._lanes.values():
            yield from lane
