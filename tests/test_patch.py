"""rl.patch: sites down to one head or a set of neurons. Invariants against the exact engine (a
whole-vector site is the engine's single-layer site; all heads of a layer are its attention output;
all neurons its MLP output) and a naive hooked run for a single head."""

from __future__ import annotations

import pytest
import torch
from conftest import float32_prob_tolerance

import relation_lens as rl
from relation_lens import Site
from relation_lens.tracing import make_noise

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"


@pytest.fixture(scope="module")
def grid(tiny_model):
    return rl.trace(tiny_model, PROMPT, subject=SUBJECT, window=1, n_samples=3)


def _noised(model, grid):
    a, b = grid.corrupt_span
    noise, _ = make_noise(model, 3, b - a, None, 0)

    def add_noise(act, hook):
        act = act.clone()
        act[:, a:b] += noise
        return act
    return add_noise


def test_whole_sites_equal_the_engine(tiny_model, grid):
    L, T = tiny_model.cfg.n_layers, len(grid.tokens)
    sites = [Site(k, l, p) for k in ("resid", "mlp", "attn") for l in range(L) for p in range(T)]
    res = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=sites, n_samples=3, batch_size=64)
    got = torch.tensor(res.values).view(3, L, T)
    for i, kind in enumerate(("resid", "mlp", "attn")):
        assert (got[i] - grid.scores[kind]).abs().max().item() <= 1e-5, kind
    # the same corrupted runs, batched differently: float32 rounding of the logits allows this much
    with torch.no_grad():
        logits = tiny_model.run_with_hooks(tiny_model.to_tokens(PROMPT).expand(3, -1), fwd_hooks=[
            ("hook_embed", _noised(tiny_model, grid))])[:, -1]
    tol = float32_prob_tolerance(grid.corrupted_prob, logits.abs().max().item(), tiny_model.cfg.d_model)
    assert res.corrupted_value == pytest.approx(grid.corrupted_prob, abs=tol)
    assert res.corrupted_value == pytest.approx(logits.softmax(-1)[:, grid.target_token].mean().item(), abs=tol)


def test_all_heads_are_the_attention_output_and_all_neurons_the_mlp(tiny_model, grid):
    c = tiny_model.cfg
    T = len(grid.tokens)
    heads = [[Site("head", l, p, head=h) for h in range(c.n_heads)] for l in range(c.n_layers) for p in range(T)]
    neurons = [Site("neurons", l, p, neurons=tuple(range(c.d_mlp))) for l in range(c.n_layers) for p in range(T)]
    h = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=heads, n_samples=3)
    n = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=neurons, n_samples=3)
    assert (torch.tensor(h.values).view(c.n_layers, T) - grid.scores["attn"]).abs().max().item() <= 1e-5
    assert (torch.tensor(n.values).view(c.n_layers, T) - grid.scores["mlp"]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_one_head_and_some_neurons_equal_a_naive_hooked_run(tiny_model, grid):
    a, b = grid.corrupt_span
    p = b - 1
    site_h, site_n = Site("head", 1, p, head=2), Site("neurons", 2, p, neurons=(0, 5, 9))
    res = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[site_h, [site_h, site_n]], n_samples=3)
    tokens = tiny_model.to_tokens(PROMPT)[0]
    noise, _ = make_noise(tiny_model, 3, b - a, None, 0)
    _, clean = tiny_model.run_with_cache(tokens[None])

    def add_noise(act, hook):
        act = act.clone()
        act[:, a:b] += noise
        return act

    def put_head(act, hook):
        act = act.clone()
        act[:, p, 2] = clean["blocks.1.attn.hook_z"][0, p, 2]
        return act

    def put_neurons(act, hook):
        act = act.clone()
        act[:, p, [0, 5, 9]] = clean["blocks.2.mlp.hook_post"][0, p, [0, 5, 9]]
        return act

    batch = tokens[None].expand(3, -1)
    want = []
    for hooks in ([("blocks.1.attn.hook_z", put_head)],
                  [("blocks.1.attn.hook_z", put_head), ("blocks.2.mlp.hook_post", put_neurons)]):
        logits = tiny_model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)] + hooks)
        want.append(logits[:, -1].softmax(-1)[:, grid.target_token].mean().item())
    assert res.values == pytest.approx(want, abs=1e-6)
    assert rl.PatchResult.from_dict(res.to_dict()) == res
    assert len(res.plot().axes[0].patches) == len(res.values)  # a bar per group
    assert res.normalised()[0] == pytest.approx((res.values[0] - res.corrupted_value)
                                                / (res.clean_value - res.corrupted_value))


@pytest.mark.parametrize("site, match", [
    (Site("head", 0, 1), "needs head"), (Site("mlp", 9, 1), "layer 9"), (Site("mlp", 0, 99), "position 99"),
    (Site("neurons", 0, 1, neurons=(10_000,)), "needs neurons"), (Site("mlp", 0, 1, head=1), "is for kinds"),
    (Site("mixer", 0, 1), "kind 'mixer'"), ("mlp 0 1", "is not a Site"),
])
def test_bad_sites_are_named(tiny_model, site, match):
    with pytest.raises(rl.ConfigError, match=match):
        rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[site], n_samples=2)
