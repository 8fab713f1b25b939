"""Attribution patching against an independent oracle: central finite differences of the metric
along the patch direction, one hooked site (layer, position) at a time, on a float64 model; the
windows summed by the test itself."""

from __future__ import annotations

import pytest
import torch
from conftest import EPS32, random_model
from oracle import window as oracle_window

import relation_lens as rl

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"
NAMES = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out"}


@pytest.fixture(scope="module")
def model64(tokenizer):
    return random_model(tokenizer, "tiny64", n_layers=3, dtype=torch.float64)


@torch.no_grad()
def _finite_difference_grids(model, result, noise, metric, contrast, w, eps=1e-5):
    tokens = model.to_tokens(result.prompt)[0]
    a, b = result.corrupt_span
    n, L, T = noise.shape[0], model.cfg.n_layers, tokens.shape[0]
    batch = tokens[None].expand(n, -1)
    _, clean = model.run_with_cache(tokens[None])

    def add_noise(act, hook):
        act = act.clone()
        act[:, a:b] += noise
        return act

    def value(logits):
        last = logits[:, -1].double()
        if metric == "prob":
            return last.softmax(-1)[:, result.target_token].mean().item()
        if metric == "logprob":
            return last.log_softmax(-1)[:, result.target_token].mean().item()
        return (last[:, result.target_token] - last[:, contrast]).mean().item()

    cache = {}

    def recorder(name):  # under the name asked for: a bridge's hook.name is the canonical one
        def record(act, hook):
            cache[name] = act.clone()
            return act
        return record

    names = [NAMES[k].format(j) for k in NAMES for j in range(L)]
    model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)] + [(nm, recorder(nm)) for nm in names])

    def step(name, p, scale):
        def fn(act, hook):
            act = act.clone()
            act[:, p] = cache[name][:, p] + scale * (clean[name][0, p] - cache[name][:, p])
            return act
        return fn

    base = value(model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)]))
    single = {}
    for kind in NAMES:
        g = torch.zeros(L, T, dtype=torch.float64)
        for j in range(L):
            name = NAMES[kind].format(j)
            for p in range(T):
                up = value(model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise), (name, step(name, p, eps))]))
                down = value(model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise), (name, step(name, p, -eps))]))
                g[j, p] = (up - down) / (2 * eps)
        single[kind] = g
    grids = {"resid": base + single["resid"]}
    for kind in ("mlp", "attn"):
        grids[kind] = base + torch.stack([single[kind][list(oracle_window(l, w, L))].sum(0) for l in range(L)])
    return grids, base


@pytest.mark.parametrize("metric", ["prob", "logprob", "logit_diff"])
def test_attribution_equals_finite_differences(model64, metric):
    from relation_lens.tracing import make_noise

    contrast = " Paris" if metric == "logit_diff" else None
    res = rl.trace(model64, PROMPT, subject=SUBJECT, method="attribution", metric=metric, contrast=contrast,
                   n_samples=2, window=3)
    assert res.method == "attribution"
    noise, _ = make_noise(model64, 2, res.corrupt_span[1] - res.corrupt_span[0], None, 0)
    grids, base = _finite_difference_grids(model64, res, noise, metric, res.contrast_token, 3)
    assert abs(base - res.corrupted_value) <= 4 * EPS32 * max(1.0, abs(base))  # stored in float32
    scale = max(1.0, max(g.abs().max().item() for g in grids.values()))
    for kind in grids:
        # the grids are stored in float32: 1e-6 of the scale
        assert (grids[kind] - res.scores[kind].double()).abs().max().item() <= 1e-6 * scale, kind


def test_attribution_before_the_span_is_the_corrupted_value(tiny_model):
    """Before the corrupted span the clean and corrupted activations are equal: no change."""
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, method="attribution", n_samples=2, window=3)
    a = res.corrupt_span[0]
    for kind in res.scores:
        assert torch.allclose(res.scores[kind][:, :a], torch.full_like(res.scores[kind][:, :a], res.corrupted_value))
    again = rl.TraceResult.from_dict(res.to_dict())
    assert again == res and again.method == "attribution"


def test_attribution_in_a_dataset_and_bad_method(tiny_model):
    facts = [(PROMPT, SUBJECT), ("Paris is the capital of", "Paris")]
    res = rl.trace_dataset(tiny_model, facts, method="attribution", n_samples=2, window=3, exclude_incorrect=False)
    single = rl.trace(tiny_model, PROMPT, subject=SUBJECT, method="attribution", n_samples=2, window=3)
    assert max((res.results[0].scores[k] - single.scores[k]).abs().max().item() for k in single.scores) == 0
    with pytest.raises(rl.ConfigError, match="method='gradient'"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, method="gradient")
