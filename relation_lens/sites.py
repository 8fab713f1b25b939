"""Sites of a model's forward pass that patching restores, each at one token position: the residual
stream (after a block, before it, between its attention and MLP), an MLP or attention output, one
head's output (``hook_z``), query, key or value, one head's attention pattern row, the MLP's input,
or a set of MLP neurons (``hook_post``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from relation_lens.errors import ConfigError, UnsupportedModelError
from relation_lens.model_interface import Model, is_bridge

SITE_KINDS = ("resid", "mlp", "attn", "head", "neurons", "q", "k", "v", "pattern", "mlp_in", "resid_pre", "resid_mid")
HEAD_KINDS = ("head", "q", "k", "v", "pattern")  # sites that name one head
_HOOK = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out",
         "head": "blocks.{}.attn.hook_z", "neurons": "blocks.{}.mlp.hook_post", "q": "blocks.{}.attn.hook_q",
         "k": "blocks.{}.attn.hook_k", "v": "blocks.{}.attn.hook_v", "pattern": "blocks.{}.attn.hook_pattern",
         "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid"}


@dataclass(frozen=True)
class Site:
    """One site at token ``position`` of block ``layer``. ``kind``:

    * ``"resid"``: the residual stream after the block (``hook_resid_post``); ``"resid_pre"`` before
      it; ``"resid_mid"`` between its attention and its MLP (not in parallel-attention blocks).
    * ``"mlp"`` / ``"attn"``: the block's MLP / attention output.
    * ``"mlp_in"``: what the MLP reads, after its normalisation (restoring it changes the MLP's
      output only, not the residual stream that flows past it).
    * ``"head"``: one head's output before ``W_O`` (``hook_z``); ``"q"`` / ``"k"`` / ``"v"``: its query,
      key or value (``hook_q/k/v``; under grouped-query attention ``head`` counts the key/value heads
      for ``"k"`` and ``"v"``); ``"pattern"``: its attention row at query ``position`` (``hook_pattern``).
      Give ``head``.
    * ``"neurons"``: MLP activations after the nonlinearity (``hook_post``); give ``neurons``.
    """
    kind: str
    layer: int
    position: int
    head: int | None = None
    neurons: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "position": self.position, "head": self.head,
                "neurons": None if self.neurons is None else list(self.neurons)}

    def index(self) -> tuple:
        """Where the site sits in its hook's activation of one prompt (no batch dimension)."""
        if self.kind == "pattern":  # [head, query, key]
            return (self.head, self.position)
        if self.kind in HEAD_KINDS:  # [pos, head, d_head]
            return (self.position, self.head)
        if self.kind == "neurons":
            return (self.position, list(self.neurons or ()))
        return (self.position,)


def site_hook(model: Model, site: Site) -> str:
    """The hook point whose activation ``site`` is part of. The MLP's input is ``mlp.hook_in`` on a
    TransformerLens 4 bridge (the MLP module's input, after the norm); on TransformerLens 3 it is
    ``ln2.hook_normalized`` (the same tensor), or ``hook_mlp_in`` in a block without a norm (the
    same again, run with :func:`site_hooks_enabled`)."""
    if site.kind != "mlp_in":
        return _HOOK[site.kind].format(site.layer)
    if is_bridge(model):
        return f"blocks.{site.layer}.mlp.hook_in"
    name = f"blocks.{site.layer}.ln2.hook_normalized"
    return name if name in model.hook_dict else f"blocks.{site.layer}.hook_mlp_in"


@contextmanager
def site_hooks_enabled(model: Model, names: list[str]) -> Iterator[None]:
    """TransformerLens 3 fires ``hook_mlp_in`` only with ``use_hook_mlp_in`` set: set it for the
    block and put it back after (the model is left as it was)."""
    need = any(n.endswith(".hook_mlp_in") for n in names)
    before = getattr(model.cfg, "use_hook_mlp_in", False)
    if need and not before:
        model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        if need and not before:
            model.set_use_hook_mlp_in(False)


_WRITABLE: dict[tuple[int, str], bool] = {}  # (id(model), kind) -> checked


def check_site_writes(model: Model, site: Site) -> None:
    """A hook that fires after the fact (some TransformerLens 4 adapters, e.g. GPT-J's attention
    pattern) would let a patch change nothing without a word. Once per model and kind: on a
    three-token forward pass, adding 1 to the site's hook at layer 0 must fire and change the logits;
    otherwise :class:`UnsupportedModelError` names the hook."""
    key = (id(model), site.kind)
    if key in _WRITABLE:
        return
    probe = Site(site.kind, 0, 0, head=0 if site.kind in HEAD_KINDS else None,
                 neurons=(0,) if site.kind == "neurons" else None)
    name = site_hook(model, probe)
    fired: list[bool] = []

    def delta(act: torch.Tensor) -> torch.Tensor:  # not constant: a norm would take a constant shift away
        g = torch.Generator().manual_seed(0)
        return torch.randn(act.shape, generator=g).to(act.device, act.dtype)

    def bump(act, hook):
        fired.append(True)
        return act + delta(act)

    tokens = torch.zeros((1, 3), dtype=torch.long, device=model.cfg.device)
    with torch.no_grad(), site_hooks_enabled(model, [name]):
        base = model(tokens)
        with model.hooks(fwd_hooks=[(name, bump)]):
            moved = model(tokens)
        if site.kind == "resid_mid" and fired:
            # the residual inside the block is the residual before it plus the attention output:
            # a change there must act as the same change to the attention output (on some bridges
            # the hook is the MLP norm's input, and the change never reaches the residual stream)
            with model.hooks(fwd_hooks=[(site_hook(model, Site("attn", 0, 0)), lambda act, hook: act + delta(act))]):
                same = model(tokens)
            if float((same - moved).abs().max()) > 1e-3 * float((moved - base).abs().max()):
                raise UnsupportedModelError(
                    f"the hook {name!r} on model {model.cfg.model_name!r} is not the residual stream between "
                    "attention and MLP (a change there does not act as the same change to the attention output: "
                    "it reaches the MLP only); patch 'attn', 'mlp_in' or 'resid_pre' sites instead")
    if not fired or torch.equal(base, moved):
        why = "never fired" if not fired else "fired, but changing its value changed nothing (it is read after the fact)"
        raise UnsupportedModelError(f"the hook {name!r} ({site.kind} sites) {why} on model {model.cfg.model_name!r}; "
                                    f"patching {site.kind} sites would return unpatched values, so it is refused")
    _WRITABLE[key] = True


def check_site(model: Model, site: Any, n_pos: int | None) -> Site:
    """``site`` checked against the model, and against a prompt of ``n_pos`` tokens unless ``None``."""
    if not isinstance(site, Site):
        raise ConfigError(f"{site!r} is not a Site (relation_lens.Site)")
    c = model.cfg
    where = f"site {site}"
    if site.kind not in SITE_KINDS:
        raise ConfigError(f"{where}: kind {site.kind!r} is not one of {list(SITE_KINDS)}")
    if not isinstance(site.layer, int) or not 0 <= site.layer < c.n_layers:
        raise ConfigError(f"{where}: layer {site.layer} is outside [0, {c.n_layers})")
    if not isinstance(site.position, int) or (n_pos is not None and not 0 <= site.position < n_pos):
        raise ConfigError(f"{where}: position {site.position} is outside the prompt's {n_pos} tokens")
    if site.kind in HEAD_KINDS:
        kv = site.kind in ("k", "v")
        n_heads = (getattr(c, "n_key_value_heads", None) or c.n_heads) if kv else c.n_heads
        if not isinstance(site.head, int) or not 0 <= site.head < n_heads:
            what = "key/value heads" if kv and n_heads != c.n_heads else "heads"
            raise ConfigError(f"{where}: a {site.kind} site needs head in [0, {n_heads}) (the model's {what})")
    elif site.head is not None:
        raise ConfigError(f"{where}: head= is for kinds {list(HEAD_KINDS)} only")
    if site.kind == "neurons":
        if not site.neurons or not all(isinstance(i, int) and 0 <= i < (c.d_mlp or 0) for i in site.neurons):
            raise ConfigError(f"{where}: a neurons site needs neurons, a non-empty tuple of ints in [0, {c.d_mlp})")
    elif site.neurons is not None:
        raise ConfigError(f"{where}: neurons= is for kind 'neurons' only")
    if site.kind in ("mlp", "mlp_in", "neurons", "resid_mid") and c.attn_only:
        raise ConfigError(f"{where}: model {c.model_name!r} is attention-only (no MLP)")
    if site.kind == "resid_mid" and (getattr(c, "parallel_attn_mlp", False) or site_hook(model, site) not in model.hook_dict):
        raise ConfigError(f"{where}: model {c.model_name!r} runs attention and MLP in parallel: there is no residual "
                          "stream between them (use 'resid_pre' or 'mlp_in')")
    if site_hook(model, site) not in model.hook_dict:
        raise ConfigError(f"{where}: model {c.model_name!r} has no hook {site_hook(model, site)!r}")
    return site


def site_label(s: Site) -> str:
    extra = f" h{s.head}" if s.kind in HEAD_KINDS else f" n{list(s.neurons or ())}" if s.kind == "neurons" else ""
    return f"{s.kind} L{s.layer}{extra} @{s.position}"
