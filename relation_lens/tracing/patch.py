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

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from relation_lens.errors import ConfigError
from relation_lens.guards import model_lock
from relation_lens.model_interface import Model, final_logits, run_blocks
from relation_lens.results import PatchResult
from relation_lens.sites import SITE_KINDS, Site, check_site
from relation_lens.tracing.config import TraceConfig, metric_name
from relation_lens.tracing.engine import metric_values, restore_where
from relation_lens.tracing.inputs import check_model
from relation_lens.tracing.prepare import prepare

__all__ = ["patch", "Site", "PatchResult", "SITE_KINDS"]

def patch(model: Model, prompt: str, *, subject: str, sites, target: str | int | None = None,
          config: TraceConfig | None = None, corrupted_prompt: str | None = None, contrast: str | int | None = None,
          **settings: Any) -> PatchResult:
    """Restore each group of ``sites`` (a :class:`Site`, or a list of them restored together) in the
    corrupted run of ``prompt`` and measure the metric at the last position.

    Raises:
        ConfigError naming a site that does not exist in the model or prompt; the errors of
        :func:`relation_lens.trace` for the prompt, corruption, target and metric.
    """
    cfg = TraceConfig.of(config, settings)
    check_model(model, ("resid",), prompt)
    groups = [tuple(g) if isinstance(g, (list, tuple)) else (g,) for g in sites]
    if not groups or any(not g for g in groups):
        raise ConfigError("sites is empty, or holds an empty group")
    names = sorted({check_site(model, s, None).hook for g in groups for s in g})
    with model_lock(model), torch.no_grad():
        job = prepare(model, prompt, subject, target, cfg.replace(kinds=("resid",), method="exact"),
                       corrupted_prompt, contrast, engine=False, clean_hooks=names)
        groups = [tuple(check_site(model, s, job.job.n_tokens) for s in g) for g in groups]
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
            hooks: list[tuple[str | Callable, Callable]] = [(name, _restorer(cache[name], masks[name])) for name in names if masks[name].any()]
            start = job.start.repeat(len(chunk), 1, 1)
            with model.hooks(fwd_hooks=hooks):
                logits = final_logits(model, run_blocks(model, start, 0, model.cfg.n_layers))[:, -1]
            targets = torch.full((len(chunk) * n,), job.job.target)
            contrasts = None if job.job.contrast is None else torch.full((len(chunk) * n,), job.job.contrast)
            v = metric_values(logits, targets, cfg.metric, contrasts).float().view(len(chunk), n).mean(1)
            values += v.tolist()
    return PatchResult(
        prompt=prompt, tokens=job.spans.str_tokens, groups=tuple(groups), values=tuple(values), metric=metric_name(cfg.metric),
        target=job.target.text, target_token=job.target.token, clean_value=job.clean_value,
        corrupted_value=job.corrupted_value, corrupt_span=job.span, corrupt_with=cfg.corrupt_with, n_samples=n,
        model_name=model.cfg.model_name,
        settings={"corrupt": job.mode, "seed": cfg.seed, "contrast": None if job.contrast is None else job.contrast.text,
                  "corrupted_prompt": None if job.counterfactual is None else job.counterfactual.prompt})


def _restorer(clean: Tensor, mask: Tensor):
    """A hook writing ``clean`` (one prompt's activation) where ``mask`` (per row) is set."""
    return lambda act, hook: restore_where(act, mask, clean[None])
