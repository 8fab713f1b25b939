"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of a sender (a head or an
MLP) on a receiver through the residual stream alone.

>>> import relation_lens as rl
>>> model = rl.load_model()
>>> res = rl.path_patch(model, "Germany is located in the continent of", subject="Germany",
...                     senders="heads", n_samples=2)
>>> tuple(res.head_grid().shape) == (model.cfg.n_layers, model.cfg.n_heads)
True

In relation_lens's direction (the corrupted run is patched; the clean run is the source):

1. **Pass 1.** The corrupted run with every head's output (``hook_z``) and every MLP's output frozen
   to its value in the corrupted run, except the sender, which receives the intervention (its clean
   value by default). The residual stream now differs from the corrupted run's by the sender's
   change alone. With ``receivers="logits"`` the final logits of this pass are the answer.
2. **Pass 2** (receivers given as sites: a head's query, key or value, ``Site("q"|"k"|"v", l, p,
   head=h)``, or an MLP's input, ``Site("mlp_in", l, p)``): each receiver's value in pass 1 is
   written into a plain corrupted run, nothing frozen, and the metric is read at the end.

``through_mlps=True`` leaves the MLPs unfrozen in pass 1 (they recompute on the changed residual),
the convention of the IOI paper's path patching, where paths may pass through MLPs; the default
(``False``) freezes them, so that only the direct residual path counts.

Both passes start at the lowest layer they change (the sender's, the receiver's), from the
corrupted run's residual there: below it they equal the corrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from relation_lens.errors import ConfigError
from relation_lens.guards import model_lock
from relation_lens.interventions import Intervention, References, as_intervention
from relation_lens.model_interface import Model, final_logits, recording_hooks, run_blocks
from relation_lens.results import PatchResult
from relation_lens.sites import Site, check_site, check_site_writes, site_hook, site_hooks_enabled
from relation_lens.spans import Prompt, Span, is_token_input, token_ids
from relation_lens.tracing.config import TraceConfig, metric_name
from relation_lens.tracing.engine import metric_values
from relation_lens.tracing.inputs import check_model
from relation_lens.tracing.patch import patcher, reference_activations
from relation_lens.tracing.prepare import prepare

__all__ = ["path_patch", "PathPatchResult", "SENDER_KINDS", "RECEIVER_KINDS"]

SENDER_KINDS = ("head", "mlp")
RECEIVER_KINDS = ("q", "k", "v", "mlp_in")


@dataclass(frozen=True, repr=False, eq=False)
class PathPatchResult(PatchResult):
    """``values[g]``: the metric with sender group ``groups[g]`` patched along the paths to
    ``receivers`` (empty: the logits) only."""
    receivers: tuple[Site, ...] = ()
    through_mlps: bool = False

    def head_grid(self) -> Tensor:
        """``[n_layers, n_heads]``: each group's value at its head, when every group is one head (at
        one or more positions), as ``senders="heads"`` makes; NaN where no group is."""
        if not all(s.kind == "head" and (s.layer, s.head) == (g[0].layer, g[0].head) for g in self.groups for s in g):
            raise ConfigError("head_grid needs every sender group to be one head (senders='heads')")
        L = 1 + max(g[0].layer for g in self.groups)
        H = 1 + max(int(g[0].head or 0) for g in self.groups)
        grid = torch.full((int(self.settings.get("n_layers", L)), int(self.settings.get("n_heads", H))), torch.nan)
        for g, v in zip(self.groups, self.values):
            grid[g[0].layer, g[0].head] = v
        return grid

    def __repr__(self) -> str:
        to = "logits" if not self.receivers else f"{len(self.receivers)} receivers"
        return (f"PathPatchResult({self.prompt!r}, {len(self.groups)} senders -> {to}, {self.metric} of "
                f"{self.target!r}: clean {self.clean_value:.4g}, corrupted {self.corrupted_value:.4g})")


def _sender_groups(model: Model, senders: Any, n_pos: int) -> list[tuple[Site, ...]]:
    if senders == "heads":
        return [tuple(Site("head", l, p, head=h) for p in range(n_pos))
                for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    if senders == "mlps":
        return [tuple(Site("mlp", l, p) for p in range(n_pos)) for l in range(model.cfg.n_layers)]
    if isinstance(senders, str):
        raise ConfigError(f"senders={senders!r}: give 'heads', 'mlps' or a list of head / MLP sites (or groups)")
    groups = [tuple(g) if isinstance(g, (list, tuple)) else (g,) for g in senders]
    if not groups or any(not g for g in groups):
        raise ConfigError("senders is empty, or holds an empty group")
    return groups


def path_patch(model: Model, prompt: Prompt, *, subject: str | Span, senders: Any, receivers: Any = "logits",
               target: str | int | None = None, config: TraceConfig | None = None,
               corrupted_prompt: Prompt | None = None, contrast: str | int | None = None,
               intervention: Any = "clean", through_mlps: bool = False, **settings: Any) -> PathPatchResult:
    """The metric with each sender group patched along its paths to ``receivers`` only.

    Args:
        senders: ``"heads"`` (every head, at every position: one group per head), ``"mlps"``, or a
            list of sites / groups of kind ``"head"`` or ``"mlp"``.
        receivers: ``"logits"``, or a list of sites of kind ``"q"``, ``"k"``, ``"v"`` or ``"mlp_in"``
            (patched together in pass 2).
        intervention: what the senders receive in pass 1 (:mod:`relation_lens.interventions`).
        through_mlps: let MLPs recompute in pass 1 (paths through MLPs count).
        The other arguments are :func:`relation_lens.patch`'s.

    Raises:
        ConfigError naming a sender or receiver that is not of the kinds above or not in the model
        or prompt; the errors of :func:`relation_lens.patch`.
    """
    cfg = TraceConfig.of(config, settings)
    check_model(model, ("resid",), prompt)
    how = as_intervention(intervention)
    if not isinstance(through_mlps, bool):
        raise ConfigError(f"through_mlps must be True or False, got {through_mlps!r}")
    if receivers == "logits":
        recv: tuple[Site, ...] = ()
    elif isinstance(receivers, str) or not receivers:
        raise ConfigError(f"receivers={receivers!r}: give 'logits' or a non-empty list of q / k / v / mlp_in sites")
    else:
        recv = tuple(receivers) if isinstance(receivers, (list, tuple)) else (receivers,)
    L = model.cfg.n_layers
    mlps = not model.cfg.attn_only
    frozen = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    frozen += [f"blocks.{l}.hook_mlp_out" for l in range(L)] if mlps and not through_mlps else []
    with model_lock(model), torch.no_grad():
        spans_T = len(token_ids(model, prompt)) if is_token_input(prompt) else len(model.to_tokens(
            cast(str, prompt), prepend_bos=model.cfg.default_prepend_bos if cfg.prepend_bos is None else cfg.prepend_bos)[0])
        groups = _sender_groups(model, senders, spans_T)
        for g in groups:
            for s in g:
                if check_site(model, s, None).kind not in SENDER_KINDS:
                    raise ConfigError(f"sender {s}: path patching sends from kinds {list(SENDER_KINDS)}")
        for s in recv:
            if check_site(model, s, None).kind not in RECEIVER_KINDS:
                raise ConfigError(f"receiver {s}: path patching receives at kinds {list(RECEIVER_KINDS)} or 'logits'")
        sender_names = sorted({site_hook(model, s) for g in groups for s in g})
        recv_names = sorted({site_hook(model, s) for s in recv})
        with site_hooks_enabled(model, recv_names):
            for s in {s.kind: s for g in groups for s in g}.values():
                check_site_writes(model, s)
            for s in {s.kind: s for s in recv}.values():
                check_site_writes(model, s)
            job = prepare(model, prompt, subject, target, cfg.replace(kinds=("resid",), method="exact"),
                           corrupted_prompt, contrast, engine=False, clean_hooks=sender_names)
            T = job.job.n_tokens
            groups = [tuple(check_site(model, s, T) for s in g) for g in groups]
            recv = tuple(check_site(model, s, T) for s in recv)
            refs = reference_activations(model, how, sender_names, cfg.prepend_bos, T)
            # the corrupted run: the frozen values, and the residual entering each block
            pre = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
            hooks, corrupt = recording_hooks(sorted(set(frozen) | set(pre)))
            with model.hooks(fwd_hooks=hooks):
                run_blocks(model, job.start, 0, L)
            samples = _run(model, job, cfg, how, groups, recv, frozen, corrupt, refs)
    return PathPatchResult(
        prompt=job.prompt, tokens=job.spans.str_tokens, groups=tuple(groups),
        values=tuple(sum(r) / len(r) for r in samples), metric=metric_name(cfg.metric),
        target=job.target.text, target_token=job.target.token, clean_value=job.clean_value,
        corrupted_value=job.corrupted_value, corrupt_span=job.span, corrupt_with=cfg.corrupt_with, n_samples=job.n,
        model_name=model.cfg.model_name,
        settings={"corrupt": job.mode, "seed": cfg.seed, "contrast": None if job.contrast is None else job.contrast.text,
                  "corrupted_prompt": None if job.counterfactual is None else job.counterfactual.prompt,
                  "intervention": how.describe(), "n_layers": L, "n_heads": model.cfg.n_heads},
        samples=tuple(samples), receivers=recv, through_mlps=through_mlps)


def _run(model: Model, job: Any, cfg: TraceConfig, how: Intervention, groups: list[tuple[Site, ...]],
         recv: tuple[Site, ...], frozen: list[str], corrupt: dict[str, Tensor], refs: References) -> list[tuple[float, ...]]:
    L, n = model.cfg.n_layers, job.n
    per_batch = max(1, cfg.batch_size // n)
    samples: list[tuple[float, ...]] = []
    for i in range(0, len(groups), per_batch):
        chunk = groups[i:i + per_batch]
        k = len(chunk)
        entries: dict[str, list[tuple[slice, Site]]] = {}
        for g, group in enumerate(chunk):
            for s in group:
                entries.setdefault(site_hook(model, s), []).append((slice(g * n, (g + 1) * n), s))
        hooks: list[tuple[str | Callable, Callable]] = [
            (name, _freezer(how, corrupt[name].repeat(k, *[1] * (corrupt[name].dim() - 1)), job.extra_clean.get(name),
                            entries.get(name, []), refs, name)) for name in frozen]
        hooks += [(name, patcher(how, job.extra_clean[name], e, refs, name)) for name, e in entries.items()
                  if name not in frozen]  # an MLP sender under through_mlps
        first = min(s.layer for g in chunk for s in g)
        if recv:  # pass 1 must reach the receivers, below the senders too (there they read the corrupted run)
            first = min(first, min(s.layer for s in recv))
        resid = corrupt[f"blocks.{first}.hook_resid_pre"].repeat(k, 1, 1)
        if not recv:
            with model.hooks(fwd_hooks=hooks):
                logits = final_logits(model, run_blocks(model, resid, first, L))[:, -1]
        else:
            names = sorted({site_hook(model, s) for s in recv})
            keep, got = recording_hooks(names)
            top = max(s.layer for s in recv) + 1
            with model.hooks(fwd_hooks=hooks + keep):
                run_blocks(model, resid, first, top)
            low = min(s.layer for s in recv)
            writes: list[tuple[str | Callable, Callable]] = [(name, _writer(got.get(name), [s for s in recv if site_hook(model, s) == name]))
                      for name in names]
            resid = corrupt[f"blocks.{low}.hook_resid_pre"].repeat(k, 1, 1)
            with model.hooks(fwd_hooks=writes):
                logits = final_logits(model, run_blocks(model, resid, low, L))[:, -1]
        targets = torch.full((k * n,), job.job.target)
        contrasts = None if job.job.contrast is None else torch.full((k * n,), job.job.contrast)
        v = metric_values(logits, targets, cfg.metric, contrasts).float().view(k, n)
        samples += [tuple(row) for row in v.tolist()]
    return samples


def _freezer(how: Intervention, frozen: Tensor, clean: Tensor | None, entries: list[tuple[slice, Site]], refs: References,
             name: str):
    """A hook replacing the activation by the corrupted run's (``frozen``, ``[rows, ...]``), then
    writing the intervention at the senders of ``entries``."""
    def hook(act, hook):
        out = frozen.to(act.device, act.dtype).clone()
        for rows, site in entries:
            ix = (rows, *site.index())
            assert clean is not None
            out[ix] = how.value(site, clean[site.index()].to(out.device, out.dtype), out[ix], refs, name).to(out.dtype)
        return out

    return hook


def _writer(values: Tensor | None, sites: list[Site]):
    """A hook writing each receiver site's pass-1 value (``values``: that pass's activation)."""
    def hook(act, hook):
        assert values is not None, "the receiver's hook did not fire in pass 1"
        act = act.clone()
        for s in sites:
            ix = (slice(None), *s.index())
            act[ix] = values[ix].to(act.device, act.dtype)
        return act

    return hook
