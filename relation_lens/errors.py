"""The one error hierarchy of relation_lens.

Every error the library raises on bad input is a :class:`RelationLensError`; the
subclasses say which kind of input was wrong, and the messages name the prompt,
the span, the hook or the shapes involved.
"""

from __future__ import annotations


class RelationLensError(Exception):
    """Base class of every error relation_lens raises on bad input."""


class ModelLoadError(RelationLensError):
    """A model name, folder or device could not be turned into a HookedTransformer."""


class HubUnreachableError(ModelLoadError):
    """The model is not cached locally and the Hugging Face hub cannot be reached."""


class UnsupportedModelError(RelationLensError):
    """The model's architecture lacks something the method needs."""


class SpanError(RelationLensError):
    """A subject or relation span could not be found in the tokenised prompt, or is empty."""


class PromptError(RelationLensError):
    """The prompt itself is unusable (empty, or longer than the model's context)."""


class TargetError(RelationLensError):
    """The target to score or to write is unusable."""


class NoiseError(RelationLensError):
    """An explicit noise setting or tensor does not fit the corrupted span."""


class EditError(RelationLensError):
    """An edit request, update or undo is invalid."""


class DataError(RelationLensError):
    """A dataset file or record is missing or malformed."""


class ConfigError(RelationLensError, ValueError):
    """A setting (window, batch size, kinds, a config field) is invalid."""


def shorten(text, limit: int = 120) -> str:
    """``repr(text)`` for an error message, cut to head ... tail with the length when it is long,
    so that a 2,000-word prompt does not fill the screen.

    >>> shorten("The Space Needle is in")
    "'The Space Needle is in'"
    >>> shorten("word " * 100, limit=20)
    "'word word ' ... 'word word ' (500 characters)"
    """
    if not isinstance(text, str) or len(text) <= limit:
        return repr(text)
    half = limit // 2
    return f"{text[:half]!r} ... {text[-half:]!r} ({len(text)} characters)"
