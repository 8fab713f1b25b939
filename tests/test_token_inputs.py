"""trace / patch / path_patch take token ids with the subject's token span instead of text and a
subject substring: the same tokens give the same grids as text; tokens text cannot produce (no BOS,
a token sequence that does not round-trip) are used as given; bad ids and spans are named."""

from __future__ import annotations

import pytest
import torch
from conftest import all_hooks

import relation_lens as rl
from relation_lens import Site

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"


def test_tokens_and_a_span_give_the_text_trace(tiny_model):
    text = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=3, window=2)
    ids = tiny_model.to_tokens(PROMPT)[0]
    for given in (ids, ids.tolist(), ids[None]):
        res = rl.trace(tiny_model, given, subject=text.subject_span, n_samples=3, window=2)
        assert res.subject_span == text.subject_span and res.relation_span == text.relation_span
        assert res.tokens == text.tokens and res.prompt.endswith(PROMPT) and SUBJECT in res.subject
        for kind in text.kinds:
            assert torch.equal(res.scores[kind], text.scores[kind]), kind
    sites = [Site("head", 1, 8, head=2), Site("q", 2, len(ids) - 1, head=0)]
    a = rl.patch(tiny_model, PROMPT, subject=SUBJECT, sites=sites, n_samples=2)
    b = rl.patch(tiny_model, ids.tolist(), subject=text.subject_span, sites=sites, n_samples=2)
    assert a.values == b.values
    pa = rl.path_patch(tiny_model, PROMPT, subject=SUBJECT, senders=[sites[0]], n_samples=2)
    pb = rl.path_patch(tiny_model, ids, subject=text.subject_span, senders=[sites[0]], n_samples=2)
    assert pa.values == pb.values


def test_tokens_are_used_as_given(tiny_model):
    """Without the BOS the text path would add, the grids are those of the shorter sequence: the
    text path with prepend_bos=False gives them too, and the BOS run's differ."""
    ids = tiny_model.to_tokens(PROMPT, prepend_bos=False)[0]
    no_bos = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, prepend_bos=False, kinds="mlp")
    res = rl.trace(tiny_model, ids, subject=no_bos.subject_span, n_samples=2, kinds="mlp")
    assert len(res.tokens) == len(ids) and torch.equal(res.scores["mlp"], no_bos.scores["mlp"])
    with_bos = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, kinds="mlp")
    assert res.scores["mlp"].shape != with_bos.scores["mlp"].shape


@pytest.mark.parametrize("prompt, subject, error, match", [
    ([1, 2, 99_999], (0, 1), rl.PromptError, "outside the vocabulary"),
    (torch.tensor([[1, 2], [3, 4]]), (0, 1), rl.PromptError, "one non-empty sequence"),
    (torch.tensor([1.0, 2.0]), (0, 1), rl.PromptError, "text or token ids"),
    ([5, 6, 7, 8], "The Space", rl.SpanError, "takes subject=\\(start, end\\)"),
    ([5, 6, 7, 8], (2, 9), rl.SpanError, "not a non-empty range"),
    ([5, 6, 7, 8], (1, 4), rl.SpanError, "relation span is empty"),
])
def test_bad_token_inputs_are_named(tiny_model, prompt, subject, error, match):
    with pytest.raises(error, match=match):
        rl.trace(tiny_model, prompt, subject=subject, n_samples=2)
    assert all_hooks(tiny_model) == 0
