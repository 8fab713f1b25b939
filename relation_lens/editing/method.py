"""What an editing method is to the rest of the library: a name in the registry
(:mod:`relation_lens.editing.registry`), the token it keys on, whether it takes one request or a
batch, the keyword options of :func:`~relation_lens.compute_edit` it takes, the :class:`EditConfig`
fields it does not read, its default settings for a model, and ``compute``, which returns an
:class:`~relation_lens.editing.updates.Update`. A new method subclasses :class:`EditMethod`
(docs/architecture.md shows one)."""

from __future__ import annotations

from typing import Any, ClassVar

from relation_lens.editing.requests import EditConfig, EditRequest
from relation_lens.editing.updates import Update
from relation_lens.errors import ConfigError, EditError
from relation_lens.model_interface import Model


class EditMethod:
    """Base class of editing methods. Subclasses set the class attributes and define :meth:`compute`.

    Attributes:
        name: the registry name (``compute_edit(method=name)``).
        key: ``"subject"`` (the last subject token) or ``"relation"`` (the prompt's last token).
        batch: ``True`` if :meth:`compute` takes a list of requests (MEMIT), ``False`` for one.
        options: the keyword arguments of :func:`~relation_lens.compute_edit` beyond the common ones
            (``stats``, ``config``, ``prefixes``, ``preserve``, ``progress``) that the method takes.
        unread: :class:`EditConfig` fields the method does not read: setting one to anything but
            ``EditConfig()``'s value is refused with a :class:`~relation_lens.ConfigError`.
    """

    name: ClassVar[str] = ""
    key: ClassVar[str] = "subject"
    batch: ClassVar[bool] = False
    options: ClassVar[frozenset[str]] = frozenset()
    unread: ClassVar[frozenset[str]] = frozenset()

    def default_config(self, model: Model, alphaedit: bool = False) -> EditConfig:
        """The settings used when ``config=None`` (``alphaedit``: the edit is solved with AlphaEdit's
        projection, which may have settings of its own on the model)."""
        return EditConfig.default_for(model, self.name, alphaedit)

    def check_options(self, given: dict[str, Any]) -> None:
        """Refuse keyword options the method does not take (``given``: those that are not ``None``)."""
        extra = sorted(set(given) - self.options)
        if extra:
            raise EditError(f"{', '.join(k + '=' for k in extra)} not taken by method {self.name!r} "
                            f"(it takes {', '.join(sorted(k + '=' for k in self.options)) or 'none of them'})")

    def check_config(self, config: EditConfig) -> None:
        """Refuse settings the method would ignore: a field in :attr:`unread` set to a non-default value."""
        ignored = {k: v for k, v in config.changed().items() if k in self.unread}
        if ignored:
            settings = ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items()))
            raise ConfigError(f"method {self.name!r} does not read EditConfig {settings}: leave "
                              f"{'it' if len(ignored) == 1 else 'them'} at the default, or use a method that does")

    def requests_of(self, request: Any) -> EditRequest | tuple[EditRequest, ...]:
        """One request (``batch=False``) or a tuple of them, checked."""
        return self.many_requests(request) if self.batch else self.one_request(request)

    def one_request(self, request: Any) -> EditRequest:
        """``request`` checked to be one :class:`EditRequest`."""
        if not isinstance(request, EditRequest):
            raise EditError(f"expected an EditRequest, got {type(request).__name__}")
        return request

    def many_requests(self, request: Any) -> tuple[EditRequest, ...]:
        """One request or several, as a checked non-empty tuple."""
        requests = (request,) if isinstance(request, EditRequest) else tuple(request)
        if not requests or not all(isinstance(r, EditRequest) for r in requests):
            raise EditError(f"method {self.name!r} needs one or more EditRequests")
        return requests

    def compute(self, model: Model, request: Any, *, config: EditConfig, stats: Any, preserve: Any,
                progress: bool) -> Update:
        """The method's update; subclasses add their keyword options (those named in ``options``)."""
        raise NotImplementedError

