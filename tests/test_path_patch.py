"""rl.path_patch against a naive two-pass implementation: whole-model hooked runs, every head (and
MLP) frozen to the corrupted run's value but the sender, the receivers recorded in pass 1 and
written in pass 2. Invariants: a sender that is every head and MLP of the model reaches the logits
exactly as restoring all of them; a receiver below its sender receives nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, random_model

import relation_lens as rl
from relation_lens import Site
from relation_lens.interventions import Zero
from relation_lens.tracing import make_noise

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"
N = 2


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    if request.param == "gpt2":
        return random_model(tokenizer, "pp-gpt2", n_layers=3, act_fn="gelu_new", normalization_type="LN")
    return random_model(tokenizer, "pp-llama", **ARCHITECTURES["llama"])


def _idx(s):
    if s.kind == "head" or s.kind in ("q", "k", "v"):
        return (slice(None), s.position, s.head)
    return (slice(None), s.position)


def _name(model, s):
    from relation_lens.models.bridge import transformer_lens_major

    if s.kind == "mlp_in":
        return f"blocks.{s.layer}.mlp.hook_in" if transformer_lens_major() >= 4 else f"blocks.{s.layer}.ln2.hook_normalized"
    return f"blocks.{s.layer}." + {"head": "attn.hook_z", "mlp": "hook_mlp_out", "q": "attn.hook_q",
                                   "k": "attn.hook_k", "v": "attn.hook_v"}[s.kind]


@torch.no_grad()
def naive(model, span, target, senders, receivers, through_mlps=False, value=None):
    """log P(target) per noise sample, by two whole-model passes."""
    tokens = model.to_tokens(PROMPT)
    a, b = span
    noise, _ = make_noise(model, N, b - a, None, 0)
    L = model.cfg.n_layers

    def add_noise(act, hook):
        act = act.clone()
        act[:, a:b] += noise
        return act

    batch = tokens.expand(N, -1)
    frozen = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    frozen += [] if through_mlps else [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    _, clean = model.run_with_cache(tokens)
    store = {}

    def keep(act, hook, name=None):
        store[name] = act.clone()
        return act

    from functools import partial
    model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)] + [(n, partial(keep, name=n)) for n in frozen])
    corrupt = dict(store)

    def freeze(act, hook, name=None):
        out = corrupt[name].clone() if name in corrupt else act.clone()
        for s in senders:
            if _name(model, s) == name:
                ix = _idx(s)
                out[ix] = clean[name][0][ix[1:]] if value is None else value(out[ix])
        return out

    names = sorted(set(frozen) | {_name(model, s) for s in senders})
    recorded = {}

    def record(act, hook, name=None):
        recorded[name] = act.clone()
        return act

    recv_names = sorted({_name(model, s) for s in receivers})
    logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)] + [(n, partial(freeze, name=n)) for n in names]
                                  + [(n, partial(record, name=n)) for n in recv_names])
    if receivers:
        def write(act, hook, name=None):
            act = act.clone()
            for s in receivers:
                if _name(model, s) == name:
                    ix = _idx(s)
                    act[ix] = recorded[name][ix]
            return act
        logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)] + [(n, partial(write, name=n)) for n in recv_names])
    return logits[:, -1].float().log_softmax(-1)[:, target].tolist()


def _span(model):
    return rl.patch(model, PROMPT, subject=SUBJECT, sites=[Site("resid", 0, 0)], n_samples=N)


def test_senders_to_logits_equal_the_naive_two_pass_run(model):
    g = _span(model)
    T = len(g.tokens)
    p = g.corrupt_span[1] - 1
    head = [Site("head", 1, q, head=1) for q in range(T)]
    groups = [head, [Site("mlp", 0, p)], [Site("head", 0, p, head=0), Site("mlp", 1, p)]]
    for through in (False, True):
        res = rl.path_patch(model, PROMPT, subject=SUBJECT, senders=groups, n_samples=N, metric="logprob",
                            through_mlps=through)
        for grp, got in zip(groups, res.samples):
            want = naive(model, g.corrupt_span, g.target_token, grp, [], through_mlps=through)
            assert got == pytest.approx(want, rel=1e-6, abs=3e-6), (grp, through)
    assert max(abs(v - res.corrupted_value) for v in res.values) > 1e-4
    zero = rl.path_patch(model, PROMPT, subject=SUBJECT, senders=groups[:1], n_samples=N, metric="logprob",
                         intervention=Zero())
    want = naive(model, g.corrupt_span, g.target_token, groups[0], [], value=torch.zeros_like)
    assert zero.samples[0] == pytest.approx(want, rel=1e-6, abs=3e-6)


def test_senders_to_receivers_equal_the_naive_two_pass_run(model):
    g = _span(model)
    T = len(g.tokens)
    p = g.corrupt_span[1] - 1
    senders = [[Site("head", 0, q, head=h) for q in range(T) for h in range(model.cfg.n_heads)], [Site("mlp", 0, p)]]
    receivers = [[Site("q", 2, T - 1, head=1)], [Site("k", 1, p, head=0), Site("v", 1, p, head=1)], [Site("mlp_in", 2, T - 1)]]
    for recv in receivers:
        res = rl.path_patch(model, PROMPT, subject=SUBJECT, senders=senders, receivers=recv, n_samples=N,
                            metric="logprob")
        for grp, got in zip(senders, res.samples):
            want = naive(model, g.corrupt_span, g.target_token, grp, recv)
            assert got == pytest.approx(want, rel=1e-6, abs=3e-6), (grp, recv)
    # a receiver below the sender receives nothing: the corrupted run
    low = rl.path_patch(model, PROMPT, subject=SUBJECT, senders=[Site("mlp", 2, p)], receivers=[Site("q", 1, T - 1, head=0)],
                        n_samples=N, metric="logprob")
    assert low.values[0] == pytest.approx(low.corrupted_value, abs=3e-6)


def test_every_sender_at_once_is_restoring_every_output(tiny_model):
    """With every head and MLP of the model as one sender, nothing is left frozen: the last
    position's residual is its clean embedding plus every clean output, the clean run's, when the
    noise sits on the subject (not on the last token)."""
    c = tiny_model.cfg
    g = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[Site("resid", 0, 0)], n_samples=N, corrupt="subject")
    T = len(g.tokens)
    everything = [Site("head", l, q, head=h) for l in range(c.n_layers) for q in range(T) for h in range(c.n_heads)]
    everything += [Site("mlp", l, q) for l in range(c.n_layers) for q in range(T)]
    res = rl.path_patch(tiny_model, PROMPT, subject=SUBJECT, senders=[everything], n_samples=N, metric="logprob",
                        corrupt="subject")
    assert res.values[0] == pytest.approx(res.clean_value, abs=2e-5)
    assert abs(res.corrupted_value - res.clean_value) > 1e-2


def test_the_head_grid_and_its_figure(tiny_model, tmp_path):
    res = rl.path_patch(tiny_model, PROMPT, subject=SUBJECT, senders="heads", n_samples=N)
    grid = res.head_grid()
    c = tiny_model.cfg
    assert grid.shape == (c.n_layers, c.n_heads) and not grid.isnan().any()
    one = rl.path_patch(tiny_model, PROMPT, subject=SUBJECT, senders=[res.groups[5]], n_samples=N)
    assert grid[res.groups[5][0].layer, res.groups[5][0].head].item() == pytest.approx(one.values[0], abs=1e-6)
    assert rl.PathPatchResult.from_dict(res.to_dict()) == res
    fig = res.plot(tmp_path / "pp.png")
    assert (tmp_path / "pp.png").stat().st_size > 0 and len(fig.axes) >= 1
    assert "<table" in res.to_html()


@pytest.mark.parametrize("kw, match", [
    (dict(senders=[Site("q", 0, 1, head=0)]), "sends from kinds"),
    (dict(senders=[Site("mlp", 0, 1)], receivers=[Site("resid", 1, 1)]), "receives at kinds"),
    (dict(senders="everything"), "senders='everything'"), (dict(senders=[]), "senders is empty"),
    (dict(senders=[Site("mlp", 0, 1)], receivers="all"), "receivers='all'"),
    (dict(senders=[Site("mlp", 0, 99)]), "position 99"),
])
def test_bad_senders_and_receivers_are_named(tiny_model, kw, match):
    with pytest.raises(rl.ConfigError, match=match):
        rl.path_patch(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, **kw)
