"""What the result types share: a JSON round trip (each defines ``to_dict`` and ``from_dict``) and
value equality for dataclasses that hold tensors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch


SCHEMA_VERSION = 1


def json_safe(x):
    """``x`` with every NaN/Inf float replaced by ``None`` (JSON has no NaN; other tools reject
    Python's bare ``NaN``), through dicts, lists and tuples."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _nan_lists(x):
    """The inverse inside number lists: ``None`` in a list (a tensor's or an interval's) back to NaN."""
    if isinstance(x, list):
        return [float("nan") if v is None else _nan_lists(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan_lists(v) for k, v in x.items()}
    return x


def known_fields(cls, d: dict) -> dict:
    """``d`` restricted to ``cls``'s fields, ready for its constructor: keys written by a newer
    version (or the version stamps) are dropped, ``None`` in number lists and in ``float`` fields
    becomes NaN again. Reads files with bare ``NaN`` (older versions) as well."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in d.items():
        if k not in names:
            continue
        if v is None and names[k].type in ("float", float):
            v = float("nan")
        out[k] = _nan_lists(v)
    return out


class JsonRoundTrip:
    def to_json(self, path: str | Path | None = None) -> str:
        """The result as strict JSON text (NaN written as ``null``), stamped with the library and
        schema versions; also written to ``path`` if given."""
        from relation_lens import __version__

        d = {"relation_lens_version": __version__, "schema_version": SCHEMA_VERSION, **self.to_dict()}
        text = json.dumps(json_safe(d), indent=1, allow_nan=False)
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
