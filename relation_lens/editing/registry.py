"""The editing methods by name. :func:`compute_edit` looks the method up here and hands it the
request; evaluation and the command line list the methods from here. A new method is one module
with an :class:`~relation_lens.editing.method.EditMethod` subclass and one line in :data:`METHODS`
(or, from outside the library, one :func:`register_method` call): docs/architecture.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from relation_lens.editing.apply import Edit, apply_edit
from relation_lens.editing.memit import Memit, RelationMemit
from relation_lens.editing.method import EditMethod
from relation_lens.editing.requests import EditConfig
from relation_lens.editing.rome import RelationRome, Rome
from relation_lens.editing.updates import Update
from relation_lens.errors import EditError
from relation_lens.key_statistics import model_fingerprint
from relation_lens.model_interface import Model
from relation_lens.results import encode

METHODS: dict[str, EditMethod] = {m.name: m for m in (RelationRome(), Rome(), Memit(), RelationMemit())}


def register_method(method: EditMethod, *, replace: bool = False) -> EditMethod:
    """Add ``method`` to :data:`METHODS` under ``method.name`` (``replace=True`` to override one)."""
    if not isinstance(method, EditMethod) or not method.name:
        raise EditError(f"register_method needs an EditMethod instance with a name, got {method!r}")
    if method.name in METHODS and not replace:
        raise EditError(f"an editing method named {method.name!r} is already registered (replace=True to override)")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> EditMethod:
    """The registered method called ``name``."""
    if name not in METHODS:
        hint = (" AlphaEdit is not a method of its own: it is a projection any method takes, "
                "preserve=rl.Preserve() (e.g. compute_edit(model, request, method='rome', preserve=rl.Preserve()))."
                if isinstance(name, str) and name.lower().replace("-", "").startswith("alphaedit") else "")
        raise EditError(f"method {name!r} is not one of {sorted(METHODS)}.{hint}")
    return METHODS[name]


def default_config_of(method: EditMethod, model: Model, alphaedit: bool = False) -> EditConfig:
    """``method``'s settings for ``model`` when ``config=None`` (``alphaedit``: with AlphaEdit's
    projection). A method's own ``default_config(model)`` need not take ``alphaedit=``: it is only
    passed when true."""
    return method.default_config(model, alphaedit=True) if alphaedit else method.default_config(model)


def single_methods() -> list[str]:
    """Names of the registered methods that edit one request at a time."""
    return [name for name, m in METHODS.items() if not m.batch]


def batch_methods() -> list[str]:
    """Names of the registered methods that edit a batch of requests at once."""
    return [name for name, m in METHODS.items() if m.batch]


def compute_edit(model: Model, request, *, method: str = "relation_rome", layer: int | None = None,
                 stats=None, config: EditConfig | None = None, prefixes: Sequence[str] | None = None,
                 progress: bool = False, layers: Sequence[int] | None = None, preserve=None,
                 mom2_update_weight: float | None = None, values=None) -> Update:
    """Compute the update that makes ``model`` answer ``request.target_new`` (a list of requests for
    batch methods), with the registered method ``method``.

    Pure: the model's weights, hooks and gradients are as they were afterwards.

    Args:
        method: a name in :data:`METHODS`: ``"relation_rome"`` (key at the last relation token,
            default layer 4), ``"rome"`` (key at the last subject token, default layer from subject
            tracing), ``"memit"`` / ``"relation_memit"`` (a list of requests, several layers), or one
            added with :func:`register_method`.
        layer: the MLP layer to edit; ``None`` for the method's default (:func:`default_layer`).
        stats: :class:`KeyStatistics` of that layer; ``None`` computes or loads them from the disk cache
            over the default corpus.
        config: :class:`EditConfig` (``None``: the method's default for the model, e.g.
            :meth:`EditConfig.default_for`). A field the method does not read, set to anything but
            its default, raises :class:`~relation_lens.ConfigError` (MEMIT reads no ``ridge`` nor
            ``key_mode``).
        prefixes: explicit context templates (``"{}"`` where the prompt goes), overriding
            ``config.prefixes``; to reproduce an edit exactly or compare with another implementation.
        layers, mom2_update_weight, values: for ``method="memit"`` / ``"relation_memit"``, which take a list of
            requests and return a :class:`~relation_lens.editing.updates.BatchUpdate`
            (:func:`~relation_lens.editing.memit.compute_batch_edit`; ``stats`` is then a dict by layer).
        preserve: AlphaEdit's projection (:class:`~relation_lens.editing.alphaedit.Preserve`) for any
            method: the update is solved in the null space of the preserved keys.

    Raises:
        EditError: bad layer, half-precision model, a target the model already predicts, NaN/Inf.
        SpanError: the subject is not in the tokenised prompt, or no relation token follows it.
    """

    m = get_method(method)
    options = {k: v for k, v in {"layer": layer, "layers": layers, "mom2_update_weight": mom2_update_weight,
                                 "values": values}.items() if v is not None}
    m.check_options(options)
    if config is not None and not isinstance(config, EditConfig):
        raise EditError(f"config= takes an EditConfig, got {type(config).__name__}")
    config = config or default_config_of(m, model, preserve is not None)
    if prefixes is not None:
        config = dataclasses.replace(config, prefixes=tuple(prefixes))
    m.check_config(config)
    update = m.compute(model, request, config=config, stats=stats, preserve=preserve, progress=progress, **options)
    info = getattr(update, "info", None)
    if isinstance(info, dict):  # what Update.save writes beside the tensors (the model is as it was: compute is pure)
        info.setdefault("model_fingerprint", model_fingerprint(model))
        info.setdefault("config", encode(config))
    return update


def edit(model: Model, request, **kwargs) -> Edit:
    """``apply_edit(model, compute_edit(model, request, **kwargs))``."""
    return apply_edit(model, compute_edit(model, request, **kwargs))
