"""One re-entrant lock per model: tracing and editing put hooks on the shared model, so two threads
working on the same model at once would see each other's hooks. Every entry point that hooks or
edits a model holds its lock; calls on different models still run in parallel."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

_LOCKS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


@contextmanager
def model_lock(model):
    """Hold ``model``'s lock (re-entrant: a traced edit may call trace inside)."""
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    with lock:
        yield
