"""One JSON codec for every result type, driven by the dataclass' own field annotations.

:func:`encode` turns a dataclass into plain Python (tensors as nested lists, tuples as lists,
nested dataclasses as dicts); :func:`decode` reads it back by the annotation of each field
(``Float[Tensor, ...]`` -> float32 tensor, ``Tensor`` -> tensor, ``tuple[X, ...]``, ``dict[K, V]``,
``X | None``, nested dataclasses). JSON has no NaN: :meth:`Result.to_json` writes it as ``null``
and the decoder turns ``null`` back into NaN where the annotation is a float or a tensor. Fields a
newer version wrote are dropped (:func:`known_fields`); files with bare ``NaN`` (older versions)
read as well.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from relation_lens.errors import DataError
from relation_lens.version import __version__

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


def encode(value: Any) -> Any:
    """Plain Python for JSON: dataclasses field by field, tensors as nested lists, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``cls``'s fields and their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def known_fields(cls: type, d: dict) -> dict:
    """``d`` restricted to ``cls``'s fields (keys written by a newer version, or the version
    stamps, are dropped)."""
    names = field_types(cls)
    return {k: v for k, v in d.items() if k in names}


def _nan(v):
    return math.nan if v is None else v


def _tensor_dtype(tp: Any) -> torch.dtype | None:
    """float32 for a jaxtyping ``Float[Tensor, ...]``; ``None`` (torch's own choice) otherwise."""
    dtypes = getattr(tp, "dtypes", None)
    return torch.float32 if dtypes is not None and "float32" in dtypes else None


def _is_tensor_type(tp: Any) -> bool:
    return tp is Tensor or getattr(tp, "array_type", None) is Tensor


def _nan_lists(x):
    if isinstance(x, list):
        return [_nan_lists(v) for v in x]
    return _nan(x)


def decode(tp: Any, value: Any) -> Any:
    """``value`` (as :func:`encode` wrote it, through JSON) read back as annotation ``tp`` says."""
    if _is_tensor_type(tp):
        return torch.tensor(_nan_lists(value), dtype=_tensor_dtype(tp))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return decode_dataclass(tp, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else math.nan
        inner = [a for a in args if a is not type(None)]
        return decode(inner[0], value)
    if tp is float:
        return float(_nan(value))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in value)
        return tuple(decode(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin is list:
        return [decode(args[0], v) for v in value] if args else list(value)
    if origin is dict:
        return {k: decode(args[1], v) for k, v in value.items()} if args else dict(value)
    return value


def decode_dataclass(cls: type, d: dict) -> Any:
    """An instance of ``cls`` from a dict :func:`encode` wrote; fields missing from ``d`` take
    their defaults."""
    if not isinstance(d, dict):
        raise DataError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
    types_ = field_types(cls)
    return cls(**{k: decode(types_[k], v) for k, v in known_fields(cls, d).items()})


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
    generated ``__eq__`` would ask a tensor for its truth value), leaving out fields declared with
    ``field(compare=False)`` (descriptions). Use with ``eq=False``."""

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(values_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                   if f.compare)

    __hash__ = None  # type: ignore[assignment]  # equal values must hash alike, and tensors do not hash by value


Renderer = Callable[..., Any]
_VIEWS: dict[tuple[type, str], Renderer] = {}


def register_view(cls: type, kind: str) -> Callable[[Renderer], Renderer]:
    """Register a renderer of ``cls`` (``kind`` ``"plot"`` or ``"html"``): the views modules call
    this when they are imported, so result types reach their renderers without importing them."""

    def deco(fn: Renderer) -> Renderer:
        _VIEWS[(cls, kind)] = fn
        return fn

    return deco


def _view(obj: Any, kind: str) -> Renderer:
    for klass in type(obj).__mro__:
        if (klass, kind) in _VIEWS:
            return _VIEWS[(klass, kind)]
    raise TypeError(f"no {kind} view is registered for {type(obj).__name__} (import relation_lens.views)")


class Result(ValueEquality):
    """Base of the result types (frozen dataclasses with ``eq=False``): the JSON codec, value
    equality and the views (``plot``, ``to_html``, notebook display) registered by
    :mod:`relation_lens.views`."""

    def to_dict(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return decode_dataclass(cls, d)

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as strict JSON text (NaN written as ``null``), stamped with the library and
        schema versions; also written to ``path`` if given."""
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

    def plot(self, path: str | Path | None = None, **kwargs: Any):
        """A matplotlib figure of the result, saved to ``path`` (format from its suffix) if given."""
        return _view(self, "plot")(self, path, **kwargs)

    def to_html(self) -> str:
        """A self-contained (offline) HTML view."""
        return _view(self, "html")(self)

    def _repr_html_(self) -> str:  # notebooks: offline, no network probe
        return self.to_html()
