"""Token-replacement corruption and the metrics (prob / logprob / logit_diff, normalised scores),
against the naive oracle (tests/oracle.py: one forward pass per site, ROME's procedure with the
corrupted row running the counterfactual's tokens)."""

from __future__ import annotations

import pytest
import torch
from oracle import naive_trace

import relation_lens as rl
from relation_lens.spans import token_offsets

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"
TOL = {"prob": 1e-5, "logprob": 1e-4, "logit_diff": 1e-4}  # float32 engine vs float64 read-out of the oracle


def _oracle_tokens(model, result):
    """The corrupted tokens rebuilt from the result's counterfactual prompt, independently of the library."""
    clean = model.to_tokens(result.prompt)[0]
    other = token_offsets(model, result.corrupted_prompt)[0].to(clean.device)
    out = clean.clone()
    a, b = result.corrupt_span
    out[a:b] = other[a:b]
    return clean, out


@pytest.mark.parametrize("corrupt", ["relation", "subject"])
@pytest.mark.parametrize("metric", ["prob", "logprob", "logit_diff"])
def test_replacement_grids_equal_the_oracle(default_model, corrupt, metric):
    """On the default model (a random model's counterfactual answer is its clean answer: no contrast)."""
    tiny_model = default_model
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, corrupt=corrupt, corrupt_with="replace", metric=metric,
                   window=3)
    assert res.corrupt_with == "replace" and res.n_samples == 1 and res.metric == metric
    assert res.corrupted_prompt != PROMPT and len(res.corrupted_tokens) == len(res.tokens)
    clean, corrupted = _oracle_tokens(tiny_model, res)
    grids, base = naive_trace(tiny_model, clean, res.corrupt_span, None, res.target_token, w=3, metric=metric,
                              contrast=res.contrast_token, corrupted_tokens=corrupted)
    assert abs(base - res.corrupted_value) <= TOL[metric]
    for kind in grids:
        assert (grids[kind] - res.scores[kind]).abs().max().item() <= TOL[metric], kind
    if metric == "logit_diff":  # the default contrast is the counterfactual's answer
        with torch.no_grad():
            assert res.contrast_token == int(tiny_model(corrupted[None])[0, -1].argmax())


@pytest.mark.parametrize("metric", ["logprob", "logit_diff"])
def test_noise_with_other_metrics_equals_the_oracle(tiny_model, metric):
    from relation_lens.tracing import make_noise

    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, metric=metric, n_samples=3, window=3,
                   contrast=" Paris" if metric == "logit_diff" else None)
    noise, _ = make_noise(tiny_model, 3, res.corrupt_span[1] - res.corrupt_span[0], None, 0)
    grids, base = naive_trace(tiny_model, tiny_model.to_tokens(PROMPT)[0], res.corrupt_span, noise, res.target_token,
                              w=3, metric=metric, contrast=res.contrast_token)
    assert abs(base - res.corrupted_value) <= TOL[metric]
    for kind in grids:
        assert (grids[kind] - res.scores[kind]).abs().max().item() <= TOL[metric], kind


@pytest.mark.parametrize("corrupt_with", ["noise", "replace"])
def test_normalised_scores_are_zero_corrupted_and_one_clean(tiny_model, corrupt_with):
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, corrupt_with=corrupt_with, metric="logprob",
                   n_samples=2, window=3)
    norm = res.normalised("resid")
    a = res.corrupt_span[0]
    # before the corrupted span nothing differs: the corrupted run; the last layer's last position
    # restored is the clean run's output
    assert torch.allclose(norm[:, :a], torch.zeros_like(norm[:, :a]), atol=1e-6)
    assert abs(norm[-1, -1].item() - 1.0) <= 1e-4
    assert torch.allclose(res.indirect_effect("resid"), res.scores["resid"] - res.corrupted_value)


def test_a_given_counterfactual_is_used_on_the_span_only(tiny_model):
    other = "The Space Needle is affiliated with the religion of"
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, corrupt_with="replace", corrupted_prompt=other,
                   kinds="resid", window=3)
    a, b = res.corrupt_span
    mine = token_offsets(tiny_model, other)[0]
    assert res.corrupted_tokens[a:b] == tuple(tiny_model.tokenizer.decode([t]) for t in mine[a:b].tolist())
    assert res.corrupted_tokens[:a] == res.tokens[:a]
    again = rl.TraceResult.from_dict(res.to_dict())
    assert again == res and again.corrupted_tokens == res.corrupted_tokens and again.metric == "prob"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(corrupt_with="replace", corrupted_prompt="Paris is the capital of"), rl.PromptError, "has .* tokens"),
    (dict(corrupt_with="replace", corrupted_prompt=PROMPT), rl.PromptError, "nothing would be corrupted"),
    (dict(corrupt_with="replace", corrupt=(2, 4)), rl.PromptError, "needs corrupted_prompt"),
    (dict(corrupted_prompt="x"), rl.ConfigError, "corrupt_with='replace' only"),
    (dict(contrast=" Paris"), rl.ConfigError, "metric='logit_diff' only"),
    (dict(metric="logit_diff"), rl.ConfigError, "needs contrast="),
    (dict(metric="logit_diff", contrast=" Seattle", target=" Seattle"), rl.TargetError, "the target itself"),
    (dict(corrupt_with="shuffle"), rl.ConfigError, "corrupt_with='shuffle'"),
    (dict(metric="kl"), rl.ConfigError, "metric='kl'"),
])
def test_bad_replacement_and_metric_inputs_are_named(tiny_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, kinds="resid", window=3, **kwargs)


def test_no_counterfactual_in_the_world_is_a_clear_error(tiny_model):
    long = "The Space Needle is a tower that was built for the fair that was held in the year of"
    with pytest.raises(rl.PromptError, match="no counterfactual for relation replacement"):
        rl.trace(tiny_model, long, subject=SUBJECT, corrupt_with="replace", kinds="resid")


def test_replacement_in_a_dataset_trace(tiny_model):
    facts = [(PROMPT, SUBJECT), ("Paris is the capital of", "Paris")]
    res = rl.trace_dataset(tiny_model, facts, corrupt_with="replace", metric="logprob", window=3,
                           exclude_incorrect=False, pack=2)
    single = [rl.trace(tiny_model, p, subject=s, corrupt_with="replace", metric="logprob", window=3, seed=i)
              for i, (p, s) in enumerate(facts)]
    for a, b in zip(res.results, single):
        assert a.corrupted_prompt == b.corrupted_prompt
        assert max((a.scores[k] - b.scores[k]).abs().max().item() for k in a.scores) <= 5e-5
    assert not torch.isnan(res.mean["resid"]).all()
