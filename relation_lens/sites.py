"""Sites of a model's forward pass that patching restores: one residual stream, MLP or attention
output, one head's output (``hook_z``) or a set of MLP neurons (``hook_post``), at one position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relation_lens.errors import ConfigError
from relation_lens.model_interface import Model

SITE_KINDS = ("resid", "mlp", "attn", "head", "neurons")
_HOOK = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out",
         "head": "blocks.{}.attn.hook_z", "neurons": "blocks.{}.mlp.hook_post"}


@dataclass(frozen=True)
class Site:
    """One site: ``kind`` ``"resid"`` (the residual stream after block ``layer``), ``"mlp"`` /
    ``"attn"`` (the block's MLP / attention output), ``"head"`` (one head's output before ``W_O``,
    ``hook_z``: give ``head``) or ``"neurons"`` (MLP activations after the nonlinearity,
    ``hook_post``: give ``neurons``), at token ``position``."""
    kind: str
    layer: int
    position: int
    head: int | None = None
    neurons: tuple[int, ...] | None = None

    @property
    def hook(self) -> str:
        return _HOOK[self.kind].format(self.layer)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "position": self.position, "head": self.head,
                "neurons": None if self.neurons is None else list(self.neurons)}


def check_site(model: Model, site: Any, n_pos: int | None) -> Site:
    """``site`` checked against the model, and against a prompt of ``n_pos`` tokens unless ``None``."""
    if not isinstance(site, Site):
        raise ConfigError(f"{site!r} is not a Site (relation_lens.tracing.patch.Site)")
    c = model.cfg
    where = f"site {site}"
    if site.kind not in SITE_KINDS:
        raise ConfigError(f"{where}: kind {site.kind!r} is not one of {list(SITE_KINDS)}")
    if not 0 <= site.layer < c.n_layers:
        raise ConfigError(f"{where}: layer {site.layer} is outside [0, {c.n_layers})")
    if n_pos is not None and not 0 <= site.position < n_pos:
        raise ConfigError(f"{where}: position {site.position} is outside the prompt's {n_pos} tokens")
    if site.kind == "head":
        if site.head is None or not 0 <= site.head < c.n_heads:
            raise ConfigError(f"{where}: a head site needs head in [0, {c.n_heads})")
    elif site.head is not None:
        raise ConfigError(f"{where}: head= is for kind 'head' only")
    if site.kind == "neurons":
        if not site.neurons or not all(isinstance(i, int) and 0 <= i < (c.d_mlp or 0) for i in site.neurons):
            raise ConfigError(f"{where}: a neurons site needs neurons, a non-empty tuple of ints in [0, {c.d_mlp})")
    elif site.neurons is not None:
        raise ConfigError(f"{where}: neurons= is for kind 'neurons' only")
    return site


def site_label(s: Site) -> str:
    extra = f" h{s.head}" if s.kind == "head" else f" n{list(s.neurons or ())}" if s.kind == "neurons" else ""
    return f"{s.kind} L{s.layer}{extra} @{s.position}"
