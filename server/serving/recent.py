"""The last chat completions served (id -> model, conversation, answer), kept in memory so that a
correction can name one by `completion_id` (POST /lab/queue) instead of repeating it."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["RecentCompletion", "RecentCompletions"]


@dataclass(frozen=True)
class RecentCompletion:
    id: str
    model: str  # as served: `base` or `base+aura`
    messages: list[dict[str, Any]]  # the conversation as the client sent it
    answer: str  # the first choice's text


class RecentCompletions:
    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, RecentCompletion] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, completion_id: str, model: str, messages: list[dict[str, Any]], answer: str) -> None:
        with self._lock:
            self._items[completion_id] = RecentCompletion(completion_id, model, messages, answer)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, completion_id: str) -> RecentCompletion | None:
        with self._lock:
            return self._items.get(completion_id)
