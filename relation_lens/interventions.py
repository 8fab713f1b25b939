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

Positions index the patched prompt's tokens; a reference prompt shorter than a site's position is
refused. A pattern row of a reference prompt of another length is cut or zero-padded to the
patched prompt's length (causal attention puts nothing after the query position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from relation_lens.errors import ConfigError, shorten
from relation_lens.sites import Site

__all__ = ["Intervention", "Clean", "Zero", "Mean", "Resample", "Steer", "Function", "as_intervention"]


class Intervention:
    """Base class. ``value(site, clean, corrupted, refs)``: what the site receives; ``refs`` maps each
    reference prompt (:attr:`prompts`) to its clean activations ``{hook: [pos, ...]}``."""
    name = "intervention"
    prompts: Sequence[str] = ()

    def value(self, site: Site, clean: Tensor, corrupted: Tensor, refs: dict[str, dict[str, Tensor]],
              hook: str) -> Tensor:
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


def _reference_value(refs: dict[str, Tensor], prompt: str, site: Site, like: Tensor) -> Tensor:
    act = refs[prompt]
    n_pos = act.shape[1] if site.kind == "pattern" else act.shape[0]
    if site.position >= n_pos:
        raise ConfigError(f"reference prompt {shorten(prompt)} has {n_pos} tokens: it has no position {site.position} "
                          f"for site {site}")
    v = act[site.index()]
    if site.kind == "pattern" and v.shape[-1] != like.shape[-1]:  # keys after the query are 0: cut or pad
        k = like.shape[-1]
        v = v[..., :k] if v.shape[-1] > k else torch.nn.functional.pad(v, (0, k - v.shape[-1]))
    return v


@dataclass(frozen=True)
class Mean(Intervention):
    """The mean of the site's value over the clean runs of ``prompts`` (same position)."""
    prompts: Sequence[str] = ()  # kept as a tuple
    name = "mean"

    def __post_init__(self):
        ps = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
        if not ps or not all(isinstance(p, str) and p.strip() for p in ps):
            raise ConfigError(f"Mean needs a non-empty list of reference prompts, got {self.prompts!r}")
        object.__setattr__(self, "prompts", ps)

    def value(self, site, clean, corrupted, refs, hook):
        return torch.stack([_reference_value({p: refs[p][hook]}, p, site, clean) for p in self.prompts]).mean(0)

    def describe(self):
        return {"name": self.name, "prompts": list(self.prompts)}


@dataclass(frozen=True)
class Resample(Intervention):
    """The site's value in the clean run of another ``prompt`` (same position)."""
    prompt: str = ""
    name = "resample"

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"Resample needs the prompt to take values from, got {self.prompt!r}")

    @property
    def prompts(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.prompt,)

    def value(self, site, clean, corrupted, refs, hook):
        return _reference_value({self.prompt: refs[self.prompt][hook]}, self.prompt, site, clean)

    def describe(self):
        return {"name": self.name, "prompt": self.prompt}


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
