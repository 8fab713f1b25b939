"""Attribution patching (Nanda 2023; AtP, Kramár et al. 2024): the first-order approximation of
every patching score from one corrupted forward pass and one backward pass (the clean activations
come from the clean pass the exact engine runs too).

For a site of one layer ``j`` and position ``p`` (an MLP or attention output, or the residual stream
after block ``j``), restoring the clean activation changes the metric by about

    (a_clean[j, p] - a_corrupted[j, p]) . d metric / d a[j, p]

with the gradient taken on the corrupted run (for each noise sample; averaged as the metric is).
A windowed MLP/attention site sums the terms of the layers of its window. The grid holds the
corrupted value plus that sum, so it reads like the exact engine's. It is exact where the metric is
linear in the activation along the patch direction, and fails where restoring one site saturates
or switches the prediction (large patches at early layers whose effect passes through later
nonlinearities): docs/experiments.md measures how well it ranks sites against the exact engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens.errors import ConfigError
from relation_lens.guards import frozen_parameters
from relation_lens.model_interface import Model, final_logits, recording_hooks, run_blocks
from relation_lens.tracing.config import HOOKS, metric_name, window_layers
from relation_lens.tracing.engine import Metric, metric_values


def attribution_grids(model: Model, start: Float[Tensor, "sample pos d_model"], clean: dict[str, Tensor],
                      kinds: Sequence[str], window: int, target: int, metric: Metric = "prob",
                      contrast: int | None = None) -> dict[str, Float[Tensor, "layer pos"]]:
    """``[n_layers, n_pos]`` grids of approximate scores from the corrupted run starting at ``start``
    (the residual entering block 0) and the clean activations ``clean[kind]`` ``[layer, pos, d]``."""
    L = model.cfg.n_layers
    names = [HOOKS[k].format(j) for k in kinds for j in range(L)]
    hooks, acts = recording_hooks(names)
    n = start.shape[0]
    with frozen_parameters(model), torch.enable_grad():  # gradients for the activations only
        x = start.detach().requires_grad_(True)
        with model.hooks(fwd_hooks=hooks):
            logits = final_logits(model, run_blocks(model, x, 0, model.cfg.n_layers))[:, -1]
        targets = torch.full((n,), target)
        contrasts = None if contrast is None else torch.full((n,), contrast)
        value = metric_values(logits, targets, metric, contrasts)
        if not value.requires_grad:
            raise ConfigError(f"metric {metric_name(metric)} is not differentiable (its values carry no gradient): "
                              "attribution patching needs the gradient of the metric; build it from torch operations "
                              "on the logits (no .item(), .argmax() or torch.no_grad()), or use method='exact'")
        grads = torch.autograd.grad(value.mean(), [acts[name] for name in names])
    corrupted = value.detach().float().mean().item()
    out = {}
    for kind in kinds:
        # per layer: the first-order change of the (sample-averaged) metric when position p is restored
        terms = torch.stack([
            ((clean[kind][j].to(acts[HOOKS[kind].format(j)].device) - acts[HOOKS[kind].format(j)].detach())
             * grads[names.index(HOOKS[kind].format(j))]).sum(-1).sum(0).double().cpu()
            for j in range(L)])  # [layer, pos]
        if kind == "resid":
            grid = terms
        else:
            grid = torch.stack([terms[list(window_layers(l, window, L))].sum(0) for l in range(L)])
        out[kind] = (corrupted + grid).float()
    return out
