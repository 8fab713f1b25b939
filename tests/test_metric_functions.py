"""``metric=`` as a function of the final-position logits, in trace, trace_dataset, patch, knockout and
attribution patching.

Oracles: a function that computes a named metric gives that metric's numbers exactly (the same
arithmetic on the same logits); a metric no named one covers (the probability mass on a set of
answers) equals the naive hooked oracle of tests/oracle.py cell by cell."""

from __future__ import annotations

import pytest
import torch
from conftest import EPS32, all_hooks, checksum, same_weights
from oracle import naive_trace

import relation_lens as rl
from relation_lens.tracing import TraceConfig, make_noise

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"
FACTS = [(PROMPT, SUBJECT), ("Germany is located in the continent of", "Germany")]


def prob_of_target(logits, targets):
    return logits.softmax(-1).gather(1, targets[:, None])[:, 0]


def logprob_of_target(logits, targets):
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


def answer_set(model, k=3):
    """The probability of any of the clean run's top ``k`` answers (no named metric measures it)."""
    with torch.no_grad():
        ids = model(PROMPT)[0, -1].topk(k).indices.tolist()

    def mass(logits):
        return logits.softmax(-1)[:, ids].sum(-1)

    return mass


@pytest.mark.parametrize("named, fn", [("prob", prob_of_target), ("logprob", logprob_of_target)])
def test_a_function_computing_a_named_metric_gives_its_numbers(tiny_model, named, fn):
    kw = dict(subject=SUBJECT, n_samples=3, window=2, seed=1)
    for method in ("exact", "attribution"):
        a = rl.trace(tiny_model, PROMPT, metric=named, method=method, **kw)
        b = rl.trace(tiny_model, PROMPT, metric=fn, method=method, **kw)
        assert all(torch.equal(a.scores[k], b.scores[k]) for k in a.kinds), method
        assert (a.clean_value, a.corrupted_value) == (b.clean_value, b.corrupted_value)
        assert b.metric == f"{__name__}.{fn.__name__}"
    T = len(a.tokens)
    sites = [rl.Site("head", 1, T - 1, head=2), rl.Site("mlp", 0, 3), [rl.Site("resid", 2, 4), rl.Site("attn", 3, T - 1)]]
    pa = rl.patch(tiny_model, PROMPT, sites=sites, metric=named, **{k: v for k, v in kw.items() if k != "window"})
    pb = rl.patch(tiny_model, PROMPT, sites=sites, metric=fn, **{k: v for k, v in kw.items() if k != "window"})
    assert pa.values == pb.values and pa.clean_value == pb.clean_value
    da = rl.trace_dataset(tiny_model, FACTS, n_samples=2, window=2, metric=named, exclude_incorrect=False)
    db = rl.trace_dataset(tiny_model, FACTS, n_samples=2, window=2, metric=fn, exclude_incorrect=False)
    assert all(torch.equal(x.scores[k], y.scores[k]) for x, y in zip(da.results, db.results) for k in x.kinds)
    # knockout: the named "prob" is the relative change; a function's change is the difference
    ka = rl.knockout(tiny_model, PROMPT, subject=SUBJECT, window=2, metric=named)
    kb = rl.knockout(tiny_model, PROMPT, subject=SUBJECT, window=2, metric=fn)
    for s in ka.change:
        assert torch.equal(ka.value[s], kb.value[s])
        assert torch.equal(kb.change[s], kb.value[s] - kb.clean_value)
        if named == "prob":
            assert torch.equal(ka.value[s], ka.prob[s])
            assert torch.allclose(ka.change[s], (ka.prob[s] - ka.clean_prob) / ka.clean_prob)
        else:
            assert torch.equal(ka.change[s], kb.change[s])
    # the view says what it plots: percent of P for the named "prob", the metric's own units otherwise
    assert kb.plot().axes[0].get_ylabel() == f"change in {kb.metric}"
    assert ka.plot().axes[0].get_ylabel().startswith("% change in P(" if named == "prob" else "change in logprob")


@pytest.mark.parametrize("corrupt", ["relation", "subject"])
def test_a_metric_no_named_one_covers_equals_the_naive_oracle(tiny_model64, corrupt):
    mass = answer_set(tiny_model64)
    res = rl.trace(tiny_model64, PROMPT, subject=SUBJECT, corrupt=corrupt, n_samples=3, window=2, seed=3,
                   metric=mass, batch_size=17)
    noise, _ = make_noise(tiny_model64, 3, res.corrupt_span[1] - res.corrupt_span[0], None, 3)
    grids, corrupted = naive_trace(tiny_model64, tiny_model64.to_tokens(PROMPT)[0], res.corrupt_span, noise,
                                   res.target_token, w=2, metric=mass)
    assert abs(corrupted - res.corrupted_value) < 4 * EPS32  # the result stores float32 values
    spread = max(float(g.max() - g.min()) for g in grids.values())
    assert spread > 0.05  # the restored sites move the mass: the comparison is not between constants
    for k in res.kinds:
        assert torch.allclose(res.scores[k].double(), grids[k].double(), atol=1e-6), k
    # a metric function and the named P(target) are different numbers on the same cells
    assert not torch.allclose(res.scores["mlp"], rl.trace(tiny_model64, PROMPT, subject=SUBJECT, corrupt=corrupt,
                                                          n_samples=3, window=2, seed=3).scores["mlp"])


def test_metric_functions_are_checked_and_recorded_by_name(tiny_model):
    saved = checksum(tiny_model)
    with pytest.raises(rl.ConfigError, match=r"returned a torch.float32 tensor of shape \[\d+, 1\].*\[rows\] = \[\d+\]"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, metric=lambda logits: logits[:, :1])
    with pytest.raises(rl.ConfigError, match="returned float"):
        rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=[rl.Site("mlp", 0, 3)], n_samples=2,
                 metric=lambda logits: float(logits[0, 0]))
    with pytest.raises(rl.ConfigError, match="returned a torch.int64 tensor"):
        rl.knockout(tiny_model, PROMPT, subject=SUBJECT, metric=lambda logits: logits.argmax(-1))
    with pytest.raises(rl.ConfigError, match="is not differentiable"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, method="attribution",
                 metric=lambda logits: (logits.argmax(-1) == 5).float())
    with pytest.raises(rl.ConfigError, match="or a function of the final-position logits"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, metric="accuracy")
    with pytest.raises(rl.ConfigError, match="knockout's metric='logit_diff'"):
        rl.knockout(tiny_model, PROMPT, subject=SUBJECT, metric="logit_diff")
    assert same_weights(tiny_model, saved) and all_hooks(tiny_model) == 0
    # a checkpointed run records a function by module and name, so a resumed run with it matches
    assert TraceConfig(metric=prob_of_target).to_dict()["metric"] == f"{__name__}.prob_of_target"
