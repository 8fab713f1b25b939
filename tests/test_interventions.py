"""rl.patch's sites (queries, keys, values, attention patterns, MLP inputs, the residual before and
inside a block) and interventions (zero, mean, resample, steering, a function), each against a
naive hooked run of the whole model: noise on the corrupted span's embeddings, one hook writing the
expected value, the metric read per noise sample. Invariants tie the new sites to the engine's."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, all_hooks, random_model

import relation_lens as rl
from relation_lens import Site
from relation_lens.interventions import Mean, Resample, Steer, Zero
from relation_lens.models.bridge import transformer_lens_major
from relation_lens.tracing import make_noise

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"
OTHER = "The Eiffel Tower stands in the middle of the city of"
N = 3


@pytest.fixture(scope="module", params=["gpt2", "llama", "gptj"])
def arch_model(request, tokenizer):
    if request.param == "gpt2":
        return random_model(tokenizer, "iv-gpt2", n_layers=3, act_fn="gelu_new", normalization_type="LN")
    return random_model(tokenizer, f"iv-{request.param}", **ARCHITECTURES[request.param])


def _hook_name(model, site):
    """The test's own map from a site to the TransformerLens hook that holds it."""
    bridge = transformer_lens_major() >= 4
    if site.kind == "mlp_in":
        return f"blocks.{site.layer}.mlp.hook_in" if bridge else f"blocks.{site.layer}.ln2.hook_normalized"
    return f"blocks.{site.layer}." + {
        "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "pattern": "attn.hook_pattern",
        "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "head": "attn.hook_z",
        "resid": "hook_resid_post", "mlp": "hook_mlp_out", "neurons": "mlp.hook_post"}[site.kind]


def _where(site):
    if site.kind == "pattern":
        return (slice(None), site.head, site.position)
    if site.kind in ("q", "k", "v", "head"):
        return (slice(None), site.position, site.head)
    if site.kind == "neurons":
        return (slice(None), site.position, list(site.neurons))
    return (slice(None), site.position)


@torch.no_grad()
def naive(model, prompt, span, target, group, value):
    """Per noise sample, log P(target) with each site of ``group`` set to ``value(site, clean, current)``."""
    tokens = model.to_tokens(prompt)
    a, b = span
    noise, _ = make_noise(model, N, b - a, None, 0)
    names = sorted({_hook_name(model, s) for s in group})
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)

    def add_noise(act, hook):
        act = act.clone()
        act[:, a:b] += noise
        return act

    def setter(name):
        def put(act, hook):
            act = act.clone()
            for s in group:
                if _hook_name(model, s) == name:
                    w = _where(s)
                    act[w] = value(s, cache[name][0][w[1:]], act[w])
            return act
        return put

    logits = model.run_with_hooks(tokens.expand(N, -1), fwd_hooks=[("hook_embed", add_noise)] +
                                  [(name, setter(name)) for name in names])
    return logits[:, -1].float().log_softmax(-1)[:, target].tolist()


def _spot(model):
    """The corrupted span, a position inside it, the target, and one site of every new kind."""
    grid = rl.patch(model, PROMPT, subject=SUBJECT, sites=[Site("resid", 0, 0)], n_samples=N, metric="logprob")
    p = grid.corrupt_span[1] - 2
    kinds = ["q", "k", "v", "pattern", "mlp_in", "resid_pre", "resid_mid"]
    sites = [Site(k, 1, p, head=1 if k in ("q", "k", "v", "pattern") else None) for k in kinds]
    return grid, sites


def test_every_site_kind_restores_what_a_naive_hooked_run_restores(arch_model):
    model = arch_model
    grid, sites = _spot(model)
    parallel = getattr(model.cfg, "parallel_attn_mlp", False)
    if parallel:
        with pytest.raises(rl.ConfigError, match="in parallel"):
            rl.patch(model, PROMPT, subject=SUBJECT, sites=[sites[-1]], n_samples=N, metric="logprob")
        sites = sites[:-1]
    groups = [[s] for s in sites] + [sites[:3]]  # each alone, and q, k, v together
    for kind in ("pattern", "resid_mid"):  # bridge adapters whose hook is read after the fact, or is another tensor
        try:
            rl.patch(model, PROMPT, subject=SUBJECT, sites=[s for s in sites if s.kind == kind], n_samples=1)
        except rl.UnsupportedModelError as exc:
            assert transformer_lens_major() >= 4 and f"hook_{kind}" in str(exc), exc
            groups = [g for g in groups if g[0].kind != kind]
        except rl.ConfigError:
            assert kind == "resid_mid" and parallel
    res = rl.patch(model, PROMPT, subject=SUBJECT, sites=groups, n_samples=N, metric="logprob")
    for g, got, mean in zip(groups, res.samples, res.values):
        want = naive(model, PROMPT, grid.corrupt_span, grid.target_token, g, lambda s, clean, cur: clean)
        assert got == pytest.approx(want, rel=1e-6, abs=2e-6), g
        assert mean == pytest.approx(sum(want) / N, rel=1e-6, abs=2e-6)
    # a site that matters moves the metric: these checks are not vacuous
    assert max(abs(v - res.corrupted_value) for v in res.values) > 1e-4  # 50x the tolerance


def test_new_sites_equal_the_sites_they_stand_for(tiny_model):
    """Restoring the MLP's input restores its output (and nothing else); the residual before block
    l + 1 is the residual after block l; restoring the residual inside a block and the MLP output
    together restores the residual after it."""
    grid, _ = _spot(tiny_model)
    p = grid.corrupt_span[1] - 1
    pairs = [([Site("mlp_in", 1, p)], [Site("mlp", 1, p)]), ([Site("resid_pre", 2, p)], [Site("resid", 1, p)]),
             ([Site("resid_mid", 2, p), Site("mlp", 2, p)], [Site("resid", 2, p)])]
    if transformer_lens_major() >= 4:  # the bridge's hook_resid_mid is the MLP norm's input: refused, by name
        with pytest.raises(rl.UnsupportedModelError, match="not the residual stream between"):
            rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=pairs[2][0], n_samples=N)
        pairs = pairs[:2]
    a = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[x for x, _ in pairs], n_samples=N, metric="logprob")
    b = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[y for _, y in pairs], n_samples=N, metric="logprob")
    assert a.values == pytest.approx(b.values, rel=1e-6, abs=2e-6)
    assert max(abs(v - a.corrupted_value) for v in a.values) > 1e-3


def _f(clean, corrupted, site):  # a user intervention: halfway between the corrupted and clean values
    return 0.5 * (clean + corrupted)


@pytest.mark.parametrize("kind", ["resid", "head", "neurons", "pattern", "v"])
def test_each_intervention_equals_a_naive_hooked_run(tiny_model, kind):
    model = tiny_model
    grid, _ = _spot(model)
    p = grid.corrupt_span[1] - 1
    site = Site(kind, 1, p, head=2 if kind in ("head", "pattern", "v") else None,
                neurons=(0, 5, 9) if kind == "neurons" else None)
    name = _hook_name(model, site)
    _, ref_cache = model.run_with_cache(model.to_tokens([OTHER, PROMPT + " Seattle and"]), names_filter=name)
    refs = [ref_cache[name][i] for i in range(2)]
    w = _where(site)[1:]
    shape = model.run_with_cache(model.to_tokens(PROMPT), names_filter=name)[1][name][0][w].shape
    vec = torch.linspace(-2, 2, shape.numel()).view(shape)

    def ref_value(i, clean):
        v = refs[i][w]
        if kind == "pattern":  # the other prompts are longer: keys past the query are 0, cut
            assert v[len(clean):].abs().max() == 0
            v = v[:len(clean)]
        return v

    cases = {
        "zero": (Zero(), lambda s, clean, cur: torch.zeros_like(cur)),
        "mean": (Mean([OTHER, PROMPT + " Seattle and"]), lambda s, clean, cur: 0.5 * (ref_value(0, clean) + ref_value(1, clean))),
        "resample": (Resample(OTHER), lambda s, clean, cur: ref_value(0, clean)),
        "steer": (Steer(vec, scale=0.7), lambda s, clean, cur: cur + 0.7 * vec),
        "function": (_f, lambda s, clean, cur: 0.5 * (clean + cur)),
    }
    moved = 0.0
    for label, (how, value) in cases.items():
        res = rl.patch(model, PROMPT, subject=SUBJECT, sites=[site], n_samples=N, intervention=how, metric="logprob")
        want = naive(model, PROMPT, grid.corrupt_span, grid.target_token, [site], value)
        # log-probs of logits up to ~25 read through differently batched float32 forward passes (the
        # references are one padded batch of two prompts): a few ulps of the largest value (measured on
        # TransformerLens 4's bridge: 5.7e-6 on a log-prob of -2.5 beside one of -25; in CI 9.5e-6, 10 ulps,
        # on a log-prob of -9.3 beside one of -10): 16 ulps of the largest, still 5x under what an
        # intervention moves (the `moved` check below)
        tol = 16 * torch.finfo(torch.float32).eps * max(abs(x) for x in want)
        assert res.samples[0] == pytest.approx(want, rel=1e-6, abs=max(2e-6, tol)), label
        assert res.settings["intervention"]["name"] == label
        moved = max(moved, abs(res.values[0] - res.corrupted_value))
    assert moved > 1e-4


def test_reference_prompts_aligned_from_the_end(tiny_model):
    """align="end": the reference value sits as far from its prompt's last token as the site from the
    patched prompt's (subjects of other token lengths); a pattern row's keys are aligned the same way."""
    model = tiny_model
    grid, _ = _spot(model)
    T = len(grid.tokens)
    other = "Big Ben, the clock in London, is located in the city of"
    T_other = model.to_tokens(other).shape[1]
    assert T_other > T
    for site in (Site("resid", 1, T - 2), Site("pattern", 1, T - 1, head=1)):
        name = _hook_name(model, site)
        ref = model.run_with_cache(model.to_tokens(other), names_filter=name)[1][name][0]

        def value(s, clean, cur, ref=ref):
            if s.kind == "pattern":  # query T_other - 1, keys shifted by T_other - T
                return ref[s.head, T_other - 1, T_other - T:]
            return ref[s.position - T + T_other]

        res = rl.patch(model, PROMPT, subject=SUBJECT, sites=[site], n_samples=N, metric="logprob",
                       intervention=Resample(other, align="end"))
        want = naive(model, PROMPT, grid.corrupt_span, grid.target_token, [site], value)
        assert res.samples[0] == pytest.approx(want, rel=1e-6, abs=2e-6), site
        start = rl.patch(model, PROMPT, subject=SUBJECT, sites=[site], n_samples=N, metric="logprob",
                         intervention=Resample(other))
        assert abs(start.values[0] - res.values[0]) > 1e-4  # the two alignments read other tokens
    with pytest.raises(rl.ConfigError, match="align='middle'"):
        Mean([other], align="middle")


def test_samples_and_their_interval(tiny_model):
    res = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[Site("resid", 1, 5), Site("mlp", 0, 6)], n_samples=4)
    assert [len(s) for s in res.samples] == [4, 4]
    for s, v, (mean, half) in zip(res.samples, res.values, res.ci95()):
        t = torch.tensor(s, dtype=torch.float64)
        assert v == pytest.approx(t.mean().item(), abs=1e-7) and mean == pytest.approx(v, abs=1e-7)
        assert half == pytest.approx(1.96 * t.std().item() / 2, rel=1e-9)
    assert rl.PatchResult.from_dict(res.to_dict()).samples == res.samples


@pytest.mark.parametrize("how, match", [
    (Steer(torch.ones(7)), "vector has shape"), (lambda c, x, s: torch.ones(3, 5), "returned shape"),
    (lambda c, x, s: 1.0, "returned float"), (Resample("Hi"), "has no position"), ("ablate", "not one of"),
    (3, "is not 'clean'"),
])
def test_bad_interventions_are_named_and_leave_the_model(tiny_model, how, match):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(rl.ConfigError, match=match):
        rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[Site("resid", 1, 8)], n_samples=2, intervention=how)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
    assert all_hooks(tiny_model) == 0


def test_bad_new_sites_are_named(tiny_model, arch_model):
    with pytest.raises(rl.ConfigError, match="needs head"):
        rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[Site("q", 0, 1)], n_samples=2)
    if getattr(arch_model.cfg, "n_key_value_heads", None):  # grouped-query attention: fewer key heads
        with pytest.raises(rl.ConfigError, match="key/value heads"):
            rl.patch(arch_model, PROMPT, subject=SUBJECT, sites=[Site("k", 0, 1, head=3)], n_samples=2)


def _mix(clean, corrupted, site):  # a user function: depends on both values and on the site
    return corrupted + (0.25 + 0.1 * site.layer) * (clean - corrupted)


@pytest.mark.parametrize("window, which", [(1, "all"), (3, "steer and function")])
def test_the_engine_grids_take_every_intervention_as_patch_does(tiny_model64, window, which):
    """trace(intervention=X) equals rl.patch(intervention=X) on every cell (a residual site; an MLP or
    attention output at each layer of the window), positions before the corrupted span included (an
    intervention other than the clean value changes them)."""
    from relation_lens.tracing.config import window_layers

    model = tiny_model64
    L = model.cfg.n_layers
    long = [PROMPT + " Seattle, which is in Washington", "The Eiffel Tower is located in the city of Paris in France"]
    vec = torch.linspace(-1, 1, model.cfg.d_model, dtype=torch.float64)
    hows = [Zero(), Mean(long), Mean(long, align="end"), Resample(long[1]), Steer(vec, scale=0.5), _mix]
    for how in hows if which == "all" else hows[-2:]:
        kinds = ("resid", "mlp") if window == 1 else ("attn",)  # every kind, between the two cases
        res = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=2, window=window, intervention=how, metric="logprob",
                       kinds=kinds)
        T = len(res.tokens)
        groups = [[Site(k, j, p) for j in (range(l, l + 1) if k == "resid" else window_layers(l, window, L))]
                  for k in res.kinds for l in range(L) for p in range(T)]
        want = rl.patch(model, PROMPT, subject=SUBJECT, sites=groups, n_samples=2, intervention=how, metric="logprob")
        got = torch.cat([res.scores[k].flatten() for k in res.kinds])
        assert (got - torch.tensor(want.values)).abs().max().item() <= 1e-8, how
        samples = torch.cat([res.samples[k].flatten(0, 1) for k in res.kinds])
        assert (samples - torch.tensor(want.samples)).abs().max().item() <= 1e-8
        a = res.corrupt_span[0]
        if how is not _mix and "resid" in kinds:  # before the span the intervention moves the metric (the clean value, or _mix, would not)
            assert (res.scores["resid"][:, :a] - res.corrupted_value).abs().max().item() > 1e-3, how
        assert res.settings["intervention"]["name"] == ("function" if how is _mix else how.name)


def test_engine_interventions_refuse_what_does_not_fit(tiny_model):
    with pytest.raises(rl.ConfigError, match="needs at least"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, intervention=Resample("Short one"))
    with pytest.raises(rl.ConfigError, match="hold \\[64\\]"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, intervention=Steer(torch.ones(3)))
    with pytest.raises(rl.ConfigError, match="needs method='exact'"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, intervention="zero", method="attribution")
    assert all_hooks(tiny_model) == 0
