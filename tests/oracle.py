"""A naive reference implementation of causal tracing: one forward pass per cell, exactly the
ROME procedure (row 0 of each batch runs clean, rows 1..n run with noise on the corrupted span,
and the hooked sites of rows 1..n are overwritten with row 0's values). Independent of the
engine: it shares no code with relation_lens.tracing."""

from __future__ import annotations

import torch


def window(layer, w, n_layers):
    return range(max(0, layer - w // 2), min(n_layers, layer - (-w // 2)))


@torch.no_grad()
def naive_trace(model, tokens, span, noise, target, kinds=("resid", "mlp", "attn"), w=10, metric="prob",
                contrast=None, corrupted_tokens=None, cells=None):
    """``corrupted_tokens``: token replacement instead of noise (row 1 runs those tokens; ``noise``
    is then ignored). ``cells``: only these ``(kind, layer, position)`` cells are run (the others stay 0;
    the benchmarks time a sample of cells). ``metric``: "prob", "logprob", "logit_diff" (against ``contrast``) or a function
    of the last position's logits (``[rows, d_vocab] -> [rows]``), averaged over the corrupted rows."""
    L, T = model.cfg.n_layers, tokens.shape[0]
    if corrupted_tokens is not None:
        batch, noise_hooks = torch.stack([tokens, corrupted_tokens.to(tokens.device)]), []
    else:
        batch = tokens[None].expand(noise.shape[0] + 1, -1)

        def corrupt(act, hook):
            act = act.clone()
            act[1:, span[0]:span[1]] += noise
            return act

        noise_hooks = [("hook_embed", corrupt)]

    def value(logits):
        last = logits[1:, -1].double()
        if callable(metric):  # a metric function of the logits, [rows, d_vocab] -> [rows]
            return metric(last).mean().item()
        if metric == "prob":
            return last.softmax(-1)[:, target].mean().item()
        if metric == "logprob":
            return last.log_softmax(-1)[:, target].mean().item()
        return (last[:, target] - last[:, contrast]).mean().item()

    def run(hooks):
        return value(model.run_with_hooks(batch, fwd_hooks=noise_hooks + hooks))

    def restore_at(p):
        def fn(act, hook):
            act = act.clone()
            act[1:, p] = act[0, p]
            return act
        return fn

    names = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out"}
    grids = {}
    for kind in kinds:
        grid = torch.zeros(L, T)
        for layer in range(L):
            layers = [layer] if kind == "resid" else list(window(layer, w, L))
            for p in range(T):
                if cells is not None and (kind, layer, p) not in cells:
                    continue
                grid[layer, p] = run([(names[kind].format(j), restore_at(p)) for j in layers])
        grids[kind] = grid
    return grids, run([])


@torch.no_grad()
def patched_probability(model, tokens, corrupt_span, noise, target, restore=()):
    """One corrupted run with clean values restored at ``restore`` = [(hook name, positions)], as a
    plain forward pass with hooks; the mean over noise samples of P(target) at the last position."""
    a, b = corrupt_span
    names = {name for name, _ in restore}
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)

    def add_noise(act, hook):
        act = act.clone()
        act[:, a:b] += noise.to(act.device)
        return act

    def restorer(name, positions):  # by the name asked for: a bridge's hook.name is the canonical one
        pos = list(positions)

        def fn(act, hook):
            act = act.clone()
            act[:, pos] = cache[name][0, pos]
            return act
        return fn

    hooks = [("hook_embed", add_noise)] + [(name, restorer(name, pos)) for name, pos in restore]
    logits = model.run_with_hooks(tokens.expand(noise.shape[0], -1), fwd_hooks=hooks)
    return logits[:, -1].float().softmax(-1)[:, target].mean().item()
