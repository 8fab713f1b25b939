"""Patching chosen sites, down to one attention head or a set of MLP neurons: the building block
for circuit analyses beyond the layer x position grid.

>>> import relation_lens as rl
>>> from relation_lens.tracing.patch import Site
>>> model = rl.load_model()
>>> res = rl.patch(model, "Germany is located in the continent of", subject="Germany",
...                sites=[Site("head", 0, 8, head=1), [Site("neurons", 0, 8, neurons=(3, 7))]], n_samples=2)
>>> len(res.values)
2

Each element of ``sites`` is one site or a group of sites patched together (any kinds, layers and
positions). What a site receives is ``intervention=``: its clean value by default, or zeros, a mean
over reference prompts, another prompt's value, a steering vector added, or a function of your own
(:mod:`relation_lens.interventions`). The corruption, noise, metric and target are the same as :func:`relation_lens.trace`'s
(``TraceConfig`` settings, ``corrupted_prompt=``, ``contrast=``). Every group is a set of rows
(one per noise sample) of a batched forward pass of the corrupted run, each row with its own
restoring masks on the hooks it touches; the clean values come from one clean pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from relation_lens.errors import ConfigError
from relation_lens.guards import model_lock
from relation_lens.interventions import Intervention, References, as_intervention
from relation_lens.model_interface import Model, final_logits, run_blocks
from relation_lens.results import PatchResult
from relation_lens.sites import SITE_KINDS, Site, check_site, check_site_writes, site_hook, site_hooks_enabled
from relation_lens.spans import Prompt, Span
from relation_lens.tracing.config import TraceConfig, metric_name
from relation_lens.tracing.engine import metric_values
from relation_lens.tracing.inputs import check_model
from relation_lens.tracing.prepare import prepare

__all__ = ["patch", "Site", "PatchResult", "SITE_KINDS"]

def patch(model: Model, prompt: Prompt, *, subject: str | Span, sites, target: str | int | None = None,
          config: TraceConfig | None = None, corrupted_prompt: Prompt | None = None, contrast: str | int | None = None,
          intervention: Any = "clean", **settings: Any) -> PatchResult:
    """Patch each group of ``sites`` (a :class:`Site`, or a list of them patched together) in the
    corrupted run of ``prompt`` and measure the metric at the last position.

    ``intervention``: what each site receives (``"clean"``, ``"zero"``, ``Mean(prompts)``,
    ``Resample(prompt)``, ``Steer(vector)`` or a function ``f(clean, corrupted, site)``; see
    :mod:`relation_lens.interventions`). The result keeps every noise sample's value per group
    (``samples``) besides their mean (``values``).

    Raises:
        ConfigError naming a site that does not exist in the model or prompt, or an intervention
        that does not fit its site; UnsupportedModelError when the model's hook for a kind of site
        cannot be written; the errors of :func:`relation_lens.trace` for the prompt, corruption,
        target and metric.
    """
    cfg = TraceConfig.of(config, settings)
    check_model(model, ("resid",), prompt)
    how = as_intervention(intervention)
    groups = [tuple(g) if isinstance(g, (list, tuple)) else (g,) for g in sites]
    if not groups or any(not g for g in groups):
        raise ConfigError("sites is empty, or holds an empty group")
    names = sorted({site_hook(model, check_site(model, s, None)) for g in groups for s in g})
    with model_lock(model), torch.no_grad(), site_hooks_enabled(model, names):
        for kind in sorted({s.kind for g in groups for s in g}):
            check_site_writes(model, next(s for g in groups for s in g if s.kind == kind))
        job = prepare(model, prompt, subject, target, cfg.replace(kinds=("resid",), method="exact"),
                       corrupted_prompt, contrast, engine=False, clean_hooks=names)
        groups = [tuple(check_site(model, s, job.job.n_tokens) for s in g) for g in groups]
        refs = reference_activations(model, how, names, cfg.prepend_bos, job.job.n_tokens)
        n = job.n
        samples: list[tuple[float, ...]] = []
        per_batch = max(1, cfg.batch_size // n)
        for i in range(0, len(groups), per_batch):
            chunk = groups[i:i + per_batch]
            entries: dict[str, list[tuple[slice, Site]]] = {name: [] for name in names}
            for g, group in enumerate(chunk):
                for s in group:
                    entries[site_hook(model, s)].append((slice(g * n, (g + 1) * n), s))
            hooks: list[tuple[str | Callable, Callable]] = [
                (name, patcher(how, job.extra_clean[name], e, refs, name)) for name, e in entries.items() if e]
            start = job.start.repeat(len(chunk), 1, 1)
            with model.hooks(fwd_hooks=hooks):
                logits = final_logits(model, run_blocks(model, start, 0, model.cfg.n_layers))[:, -1]
            targets = torch.full((len(chunk) * n,), job.job.target)
            contrasts = None if job.job.contrast is None else torch.full((len(chunk) * n,), job.job.contrast)
            v = metric_values(logits, targets, cfg.metric, contrasts).float().view(len(chunk), n)
            samples += [tuple(row) for row in v.tolist()]
    return PatchResult(
        prompt=job.prompt, tokens=job.spans.str_tokens, groups=tuple(groups), values=tuple(sum(r) / len(r) for r in samples),
        metric=metric_name(cfg.metric),
        target=job.target.text, target_token=job.target.token, clean_value=job.clean_value,
        corrupted_value=job.corrupted_value, corrupt_span=job.span, corrupt_with=cfg.corrupt_with, n_samples=n,
        model_name=model.cfg.model_name,
        settings={"corrupt": job.mode, "seed": cfg.seed, "contrast": None if job.contrast is None else job.contrast.text,
                  "corrupted_prompt": None if job.counterfactual is None else job.counterfactual.prompt,
                  "intervention": how.describe()},
        samples=tuple(samples))


def reference_activations(model: Model, how: Intervention, names: list[str], prepend_bos: bool | None,
                          n_pos: int) -> References:
    """Each reference prompt's clean activations at ``names`` (``{prompt: {hook: [pos, ...]}}``), for a
    patched prompt of ``n_pos`` tokens."""
    bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    out = {}
    for p in how.prompts:
        _, cache = model.run_with_cache(model.to_tokens(p, prepend_bos=bos), names_filter=lambda n: n in names)
        out[p] = {name: cache[name][0] for name in names}
    return References(out, n_pos)


def patcher(how: Intervention, clean: Tensor, entries: list[tuple[slice, Site]], refs: References, name: str):
    """A hook writing, for each ``(rows, site)`` of ``entries``, what ``how`` gives the site
    (``clean``: the hook's clean activation of the prompt, ``[pos, ...]``)."""
    def hook(act, hook):
        act = act.clone()
        for rows, site in entries:
            ix = (rows, *site.index())
            act[ix] = how.value(site, clean[site.index()].to(act.device, act.dtype), act[ix], refs, name).to(act.dtype)
        return act

    return hook
