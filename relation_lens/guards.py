"""What every entry point that hooks, edits or differentiates through a model holds while it works.

- :func:`model_lock`: one re-entrant lock per model. Tracing and editing put hooks on the shared
  model, so two threads working on the same model at once would see each other's hooks; calls on
  different models still run in parallel.
- :func:`frozen_parameters`: the parameters' ``requires_grad`` off for the duration (gradients for
  activations only) and restored after, whatever happens."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

from relation_lens.model_interface import Model

_LOCKS: weakref.WeakKeyDictionary[object, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


@contextmanager
def model_lock(model: Model):
    """Hold ``model``'s lock (re-entrant: a traced edit may call trace inside)."""
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    with lock:
        yield


@contextmanager
def frozen_parameters(model: Model):
    """Turn off ``requires_grad`` on every parameter of ``model``; restore each flag on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
