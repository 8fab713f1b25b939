"""Patching chosen sites, down to one attention head or a set of MLP neurons: the building block
for circuit analyses beyond the layer x position grid.

>>> import relation_lens as rl
>>> from relation_lens.tracing.patch import Site
>>> model = rl.load_model()
>>> res = rl.patch(model, "Germany is located in the continent of", subject="Germany",
...                sites=[Site("head", 0, 8, head=1), [Site("neurons", 0, 8, neurons=(3, 7))]], n_samples=2)
>>> len(res.values)
2

Each element of ``sites`` is one site or a group of sites restored together (any kinds, layers and
positions). The corruption, noise, metric and target are the same as :func:`relation_lens.trace`'s
(``TraceConfig`` settings, ``corrupted_prompt=``, ``contrast=``). Every group is a set of rows
(one per noise sample) of a batched forward pass of the corrupted run, each row with its own
restoring masks on the hooks it touches; the clean values come from one clean pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from relation_lens.guards import model_lock
from relation_lens.results import known_fields
from relation_lens.errors import ConfigError
from relation_lens.tracing.config import TraceConfig
from relation_lens.tracing.engine import metric_values, restore_where
from relation_lens.tracing.inputs import check_model
from relation_lens.tracing.results import _Views

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


def _check_site(model, site: Any, n_pos: int | None) -> Site:
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
        if not site.neurons or not all(isinstance(i, int) and 0 <= i < c.d_mlp for i in site.neurons):
            raise ConfigError(f"{where}: a neurons site needs neurons, a non-empty tuple of ints in [0, {c.d_mlp})")
    elif site.neurons is not None:
        raise ConfigError(f"{where}: neurons= is for kind 'neurons' only")
    return site


@dataclass(frozen=True, repr=False, eq=False)
class PatchResult(_Views):
    """``values[g]``: the metric (mean over noise samples) with group ``groups[g]`` restored."""
    prompt: str
    tokens: tuple[str, ...]
    groups: tuple[tuple[Site, ...], ...]
    values: tuple[float, ...]
    metric: str
    target: str
    target_token: int
    clean_value: float
    corrupted_value: float
    corrupt_span: tuple[int, int]
    corrupt_with: str
    n_samples: int
    model_name: str
    settings: dict = field(default_factory=dict)

    def normalised(self) -> tuple[float, ...]:
        """0 = the corrupted run, 1 = the clean run (Zhang & Nanda 2023)."""
        gap = self.clean_value - self.corrupted_value
        return tuple(math.nan if gap == 0 else (v - self.corrupted_value) / gap for v in self.values)

    def __repr__(self) -> str:
        return (f"PatchResult({self.prompt!r}, {len(self.groups)} groups, {self.metric} of {self.target!r}: clean "
                f"{self.clean_value:.4g}, corrupted {self.corrupted_value:.4g})")

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "tokens": list(self.tokens),
                "groups": [[s.to_dict() for s in g] for g in self.groups], "values": list(self.values),
                "metric": self.metric, "target": self.target, "target_token": self.target_token,
                "clean_value": self.clean_value, "corrupted_value": self.corrupted_value,
                "corrupt_span": list(self.corrupt_span), "corrupt_with": self.corrupt_with,
                "n_samples": self.n_samples, "model_name": self.model_name, "settings": self.settings}

    @classmethod
    def from_dict(cls, d: dict) -> "PatchResult":
        d = known_fields(cls, d)  # JSON's null back to NaN, newer fields dropped
        d["groups"] = tuple(tuple(Site(s["kind"], s["layer"], s["position"], s["head"],
                                       None if s["neurons"] is None else tuple(s["neurons"])) for s in g)
                            for g in d["groups"])
        d["tokens"], d["values"], d["corrupt_span"] = tuple(d["tokens"]), tuple(d["values"]), tuple(d["corrupt_span"])
        return cls(**d)

    def plot(self, path=None):
        """A bar per group: the metric with that group restored, against the clean and corrupted runs."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(4.0, 0.35 * len(self.values) + 1.5), 3.2), layout="constrained")
        ax = fig.subplots()
        labels = [", ".join(_label(s) for s in g) if len(g) < 3 else f"{len(g)} sites" for g in self.groups]
        ax.bar(range(len(self.values)), list(self.values), color="tab:blue")
        ax.axhline(self.clean_value, color="green", lw=1, ls="--", label="clean")
        ax.axhline(self.corrupted_value, color="red", lw=1, ls="--", label="corrupted")
        ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=6)
        ax.set_ylabel(f"{self.metric} of {self.target.strip()!r}")
        ax.legend(fontsize=7)
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig

    def to_html(self) -> str:
        rows = "".join(f"<tr><td>{', '.join(_label(s) for s in g)}</td><td>{v:.4g}</td></tr>"
                       for g, v in zip(self.groups, self.values))
        return (f"<div><b>{self.metric}</b> of {self.target!r}: clean {self.clean_value:.4g}, corrupted "
                f"{self.corrupted_value:.4g}<table><tr><th>restored</th><th>{self.metric}</th></tr>{rows}</table></div>")


def _label(s: Site) -> str:
    extra = f" h{s.head}" if s.kind == "head" else f" n{list(s.neurons)}" if s.kind == "neurons" else ""
    return f"{s.kind} L{s.layer}{extra} @{s.position}"


def patch(model, prompt: str, *, subject: str, sites, target: str | int | None = None,
          config: TraceConfig | None = None, corrupted_prompt: str | None = None, contrast: str | int | None = None,
          **settings: Any) -> PatchResult:
    """Restore each group of ``sites`` (a :class:`Site`, or a list of them restored together) in the
    corrupted run of ``prompt`` and measure the metric at the last position.

    Raises:
        ConfigError naming a site that does not exist in the model or prompt; the errors of
        :func:`relation_lens.trace` for the prompt, corruption, target and metric.
    """
    from relation_lens.tracing.api import _prepare

    cfg = TraceConfig.of(config, settings)
    check_model(model, ("resid",), prompt)
    groups = [tuple(g) if isinstance(g, (list, tuple)) else (g,) for g in sites]
    if not groups or any(not g for g in groups):
        raise ConfigError("sites is empty, or holds an empty group")
    names = sorted({_check_site(model, s, None).hook for g in groups for s in g})
    with model_lock(model), torch.no_grad():
        job = _prepare(model, prompt, subject, target, cfg.replace(kinds=("resid",), method="exact"),
                       corrupted_prompt, contrast, engine=False, clean_hooks=names)
        groups = [tuple(_check_site(model, s, job.job.n_tokens) for s in g) for g in groups]
        cache = job.extra_clean  # the clean pass's activations at the restored hooks
        n = job.n
        values: list[float] = []
        per_batch = max(1, cfg.batch_size // n)
        for i in range(0, len(groups), per_batch):
            chunk = groups[i:i + per_batch]
            # per row: [pos, head] for hook_z (a head's whole d_head), [pos, unit] for the others
            # (hook_post's units are neurons; a whole-vector site sets every unit)
            masks = {name: torch.zeros((len(chunk) * n, *cache[name].shape[:2]), dtype=torch.bool) for name in names}
            for g, group in enumerate(chunk):
                rows = slice(g * n, (g + 1) * n)
                for s in group:
                    m = masks[s.hook]
                    if s.kind == "head":
                        m[rows, s.position, s.head] = True
                    elif s.kind == "neurons":
                        m[rows, s.position, list(s.neurons)] = True
                    else:
                        m[rows, s.position, :] = True
            hooks = [(name, _restorer(cache[name], masks[name])) for name in names if masks[name].any()]
            start = job.start.repeat(len(chunk), 1, 1)
            with model.hooks(fwd_hooks=hooks):
                logits = model(start, start_at_layer=0)[:, -1]
            targets = torch.full((len(chunk) * n,), job.job.target)
            contrasts = None if job.job.contrast is None else torch.full((len(chunk) * n,), job.job.contrast)
            v = metric_values(logits, targets, cfg.metric, contrasts).float().view(len(chunk), n).mean(1)
            values += v.tolist()
    return PatchResult(
        prompt=prompt, tokens=job.spans.str_tokens, groups=tuple(groups), values=tuple(values), metric=cfg.metric,
        target=job.target.text, target_token=job.target.token, clean_value=job.clean_value,
        corrupted_value=job.corrupted_value, corrupt_span=job.span, corrupt_with=cfg.corrupt_with, n_samples=n,
        model_name=model.cfg.model_name,
        settings={"corrupt": job.mode, "seed": cfg.seed, "contrast": None if job.contrast is None else job.contrast.text,
                  "corrupted_prompt": None if job.counterfactual is None else job.counterfactual.prompt})


def _restorer(clean: Tensor, mask: Tensor):
    """A hook writing ``clean`` (one prompt's activation) where ``mask`` (per row) is set."""
    return lambda act, hook: restore_where(act, mask, clean[None])
