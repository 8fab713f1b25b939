"""What the result types share: a JSON round trip (each defines ``to_dict`` and ``from_dict``) and
value equality for dataclasses that hold tensors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch


class JsonRoundTrip:
    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """Read a result back from JSON text or from a file holding it."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def values_equal(a, b) -> bool:
    """Exact equality through dicts, lists and tuples, with tensors compared element by element
    (same shape and dtype; NaN equal to NaN, as a result that holds NaN should equal its copy)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        same = a == b
        if a.is_floating_point():
            same |= a.isnan() & b.isnan()
        return bool(same.all())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(values_equal, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


class ValueEquality:
    """``==`` for dataclasses that hold tensors: field by field with :func:`values_equal` (the
    generated ``__eq__`` would ask a tensor for its truth value). Use with ``eq=False``."""

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(values_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    __hash__ = None  # equal values must hash alike, and tensors do not hash by value
