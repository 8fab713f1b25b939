"""What a patched site receives: an intervention.

:func:`relation_lens.patch` (``intervention=``) and :func:`relation_lens.path_patch` write, at each
site of a group, the value an intervention gives for it:

* ``"clean"`` (:class:`Clean`, the default): the site's value in the clean run (causal tracing's
  restoration);
* ``"zero"`` (:class:`Zero`): zeros (zero ablation);
* :class:`Mean` ``(prompts)``: the mean of the site's value over the clean runs of reference
  prompts, at the same position (mean ablation);
* :class:`Resample` ``(prompt)``: the site's value in another prompt's clean run (resample ablation);
* :class:`Steer` ``(vector, scale=1.0)``: the value the patched run has there, plus ``scale * vector``
  (activation addition);
* a function ``f(clean, corrupted, site) -> Tensor``: ``clean`` is the site's clean value (the site's
  own shape: ``[d_model]``, ``[d_head]``, ``[len(neurons)]``, or the pattern row ``[n_pos]``),
  ``corrupted`` the value the patched run has there, one row per noise sample (``[rows, *that
  shape]``), ``site`` the :class:`~relation_lens.sites.Site`; it returns ``[rows, *that shape]`` (or
  what broadcasts to it).

Positions index the patched prompt's tokens; :class:`Mean` and :class:`Resample` read a reference
prompt at the same index (``align="start"``) or the same distance from the last token
(``align="end"``), and refuse a prompt without that position. A pattern row of a reference prompt of
another length is cut or zero-padded to the patched prompt's length, keys aligned the same way
(causal attention puts nothing after the query position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from relation_lens.errors import ConfigError, shorten
from relation_lens.sites import Site

__all__ = ["Intervention", "Clean", "Zero", "Mean", "Resample", "Steer", "Function", "as_intervention"]


class Intervention:
    """Base class. ``value(site, clean, corrupted, refs, hook)``: what the site receives; ``refs``
    holds each reference prompt's (:attr:`prompts`) clean activations (:class:`References`)."""
    name = "intervention"
    prompts: Sequence[str] = ()

    def value(self, site: Site, clean: Tensor, corrupted: Tensor, refs: References, hook: str) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


@dataclass(frozen=True)
class Clean(Intervention):
    """The site's value in the clean run."""
    name = "clean"

    def value(self, site, clean, corrupted, refs, hook):
        return clean


@dataclass(frozen=True)
class Zero(Intervention):
    """Zeros."""
    name = "zero"

    def value(self, site, clean, corrupted, refs, hook):
        return torch.zeros_like(corrupted)


@dataclass(frozen=True)
class References:
    """Reference prompts' clean activations (``acts[prompt][hook]``, ``[pos, ...]``) and the patched
    prompt's length."""
    acts: dict[str, dict[str, Tensor]]
    n_pos: int


def _check_align(align: str) -> None:
    if align not in ("start", "end"):
        raise ConfigError(f"align={align!r}: 'start' (the same position index) or 'end' (the same distance "
                          "from the last token)")


def _reference_value(refs: References, prompt: str, hook: str, site: Site, align: str) -> Tensor:
    """``prompt``'s clean value at ``site``: the same position index (``align="start"``) or the same
    distance from the last token (``"end"``)."""
    act = refs.acts[prompt][hook]
    n_ref = act.shape[1] if site.kind == "pattern" else act.shape[0]
    pos = site.position if align == "start" else site.position - refs.n_pos + n_ref
    if not 0 <= pos < n_ref:
        raise ConfigError(f"reference prompt {shorten(prompt)} has {n_ref} tokens: it has no position {pos} for site "
                          f"{site} (align={align!r})")
    v = act[dataclasses.replace(site, position=pos).index()]
    if site.kind == "pattern" and n_ref != refs.n_pos:  # keys after the query are 0: cut or pad to n_pos
        k = refs.n_pos
        if align == "end":  # key j of the patched prompt is key j - n_pos + n_ref of the reference
            v = v[n_ref - k:] if n_ref > k else torch.nn.functional.pad(v, (k - n_ref, 0))
        else:
            v = v[:k] if n_ref > k else torch.nn.functional.pad(v, (0, k - n_ref))
    return v


@dataclass(frozen=True)
class Mean(Intervention):
    """The mean of the site's value over the clean runs of ``prompts``, at the same position index
    (``align="start"``) or the same distance from the last token (``"end"``: prompts whose subjects
    have other token lengths)."""
    prompts: Sequence[str] = ()  # kept as a tuple
    align: str = "start"
    name = "mean"

    def __post_init__(self):
        _check_align(self.align)
        ps = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
        if not ps or not all(isinstance(p, str) and p.strip() for p in ps):
            raise ConfigError(f"Mean needs a non-empty list of reference prompts, got {self.prompts!r}")
        object.__setattr__(self, "prompts", ps)

    def value(self, site, clean, corrupted, refs, hook):
        return torch.stack([_reference_value(refs, p, hook, site, self.align) for p in self.prompts]).mean(0)

    def describe(self):
        return {"name": self.name, "prompts": list(self.prompts), "align": self.align}


@dataclass(frozen=True)
class Resample(Intervention):
    """The site's value in the clean run of another ``prompt`` (same position: ``align`` as in
    :class:`Mean`)."""
    prompt: str = ""
    align: str = "start"
    name = "resample"

    def __post_init__(self):
        _check_align(self.align)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"Resample needs the prompt to take values from, got {self.prompt!r}")

    @property
    def prompts(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.prompt,)

    def value(self, site, clean, corrupted, refs, hook):
        return _reference_value(refs, self.prompt, hook, site, self.align)

    def describe(self):
        return {"name": self.name, "prompt": self.prompt, "align": self.align}


@dataclass(frozen=True)
class Steer(Intervention):
    """The value the patched run has at the site plus ``scale * vector`` (``vector``: the site's shape)."""
    vector: Tensor = field(default_factory=lambda: torch.zeros(0))
    scale: float = 1.0
    name = "steer"

    def value(self, site, clean, corrupted, refs, hook):
        if tuple(self.vector.shape) != tuple(clean.shape):
            raise ConfigError(f"Steer's vector has shape {list(self.vector.shape)}; site {site} holds "
                              f"{list(clean.shape)}")
        return corrupted + self.scale * self.vector.to(corrupted.device, corrupted.dtype)

    def describe(self):
        return {"name": self.name, "scale": self.scale, "norm": float(self.vector.float().norm())}


@dataclass(frozen=True)
class Function(Intervention):
    """A user function ``fn(clean, corrupted, site) -> Tensor`` (see the module's docs)."""
    fn: Callable[[Tensor, Tensor, Site], Tensor] = field(default=lambda c, x, s: c)
    name = "function"

    def value(self, site, clean, corrupted, refs, hook):
        out = self.fn(clean, corrupted, site)
        if not isinstance(out, Tensor):
            raise ConfigError(f"intervention {_fn_name(self.fn)} returned {type(out).__name__} for site {site}; "
                              f"it returns a tensor of the site's value's shape {list(corrupted.shape)}")
        try:
            return torch.broadcast_to(out.to(corrupted.device, corrupted.dtype), corrupted.shape)
        except RuntimeError:
            raise ConfigError(f"intervention {_fn_name(self.fn)} returned shape {list(out.shape)} for site {site}; "
                              f"the site's value is {list(corrupted.shape)} ([rows, ...])") from None

    def describe(self):
        return {"name": self.name, "function": _fn_name(self.fn)}


def _fn_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


_NAMED: dict[str, Intervention] = {"clean": Clean(), "zero": Zero()}


def as_intervention(x: Any) -> Intervention:
    """``"clean"``, ``"zero"``, an :class:`Intervention` or a function, as an :class:`Intervention`."""
    if isinstance(x, Intervention):
        return x
    if isinstance(x, str):
        if x not in _NAMED:
            raise ConfigError(f"intervention {x!r} is not one of {sorted(_NAMED)}; give Mean(prompts), "
                              "Resample(prompt), Steer(vector) or a function f(clean, corrupted, site)")
        return _NAMED[x]
    if callable(x):
        return Function(x)
    raise ConfigError(f"intervention {x!r} is not 'clean', 'zero', an Intervention or a function")


def reference_prompts(intervention: Intervention) -> Sequence[str]:
    return tuple(intervention.prompts)
